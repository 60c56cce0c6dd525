"""GPU time per call of the fused kernels with and without dropout, exact vs tanh GELU, at
MosaicBERT-Base shapes (one micro batch of 256 x 128). Run AM; from the repository root:

    PYTHONPATH=. python benchmarks/results/h200_2026-11-29/scripts/run_am_dropout_cost.py

The "floor ms" column is the GeGLU forward's bytes (read h, write the output) at 4.2 TB/s.
"""
import torch
from benchmarks.fused_tiling import _time, _forward, _backward
from mosaicbert_ds.kernels import fused
T = 28835
g = torch.Generator(device="cuda").manual_seed(0)
h = torch.randn(T, 6144, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
d_ff = torch.randn(T, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
x = torch.randn(T, 768, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
r = torch.randn(T, 768, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
w = torch.ones(768, device="cuda", requires_grad=True); b = torch.zeros(768, device="cuda", requires_grad=True)
lb = torch.zeros(768, device="cuda", requires_grad=True)
d_h = torch.randn(T, 768, device="cuda", dtype=torch.bfloat16, generator=g)
print(f"{'kernel':28s}{'fwd ms':>9s}{'bwd ms':>9s}{'fwd floor ms':>19s}")
for approx in ("none", "tanh"):
    for p in (0.0, 0.1):
        f = lambda: fused.geglu(h, approx, p)
        print(f"{'geglu ' + approx + ' p=' + str(p):28s}{_time(_forward(f)):9.4f}{_time(_backward(f, [h], d_ff)):9.4f}"
              f"{T * 6144 * 2 * 1.5 / 4.2e9:19.4f}")
for p in (0.0, 0.1):
    f = lambda: fused.dropout_add_layer_norm(x, r, w, b, 1e-12, p, True, lb)
    print(f"{'ln p=' + str(p):28s}{_time(_forward(f)):9.4f}{_time(_backward(f, [x, r, w, b, lb], d_h)):9.4f}"
          f"{T * 768 * 2 * 4 / 4.2e9:19.4f}")
# raw copy bandwidth for reference
src = torch.empty(T * 6144, device="cuda", dtype=torch.bfloat16); dst = torch.empty_like(src)
ms = _time(lambda: (lambda: dst.copy_(src)))
print(f"copy of {src.numel() * 2 / 1e6:.0f} MB: {ms:.4f} ms = {2 * src.numel() * 2 / ms / 1e9:.2f} TB/s (read + write)")
