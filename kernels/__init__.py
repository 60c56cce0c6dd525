"""Triton kernels for MosaicBERT, installed as mosaicbert_ds.kernels (placeholder until the kernel lands)."""
raise ImportError("the Triton kernels are not built yet")
