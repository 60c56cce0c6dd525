"""Triton kernels for MosaicBERT, installed as mosaicbert_ds.kernels.

flash_attn: varlen FlashAttention with ALiBi (forward and backward).
fused:      GeGLU (+ dropout) and (bias +) dropout + residual + LayerNorm, forward and backward.
cross_entropy: the MLM loss without an fp32 copy of the logits.

Run from the repository root, Python also finds this folder as a top-level package `kernels`,
a name that belongs to Hugging Face's `kernels` distribution (which transformers imports). Loaded
under that name, this file steps aside: it loads the installed distribution in its place or,
when none is installed, leaves an empty module without __file__, which is what Python gives for
a bare namespace folder and what transformers reads as "kernels is not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repo]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        import types

        sys.modules["kernels"] = types.ModuleType("kernels")  # the import returns what sys.modules holds
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
else:
    from .flash_attn import flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func

    __all__ = ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func"]
