"""Where a MosaicBERT-Base training step spends its GPU time (torch.profiler, one H200).

    python -m benchmarks.profile_step [--batch 256]

Same step as benchmarks.step (autocast bf16, fused AdamW, C4-like batch at 128). Prints the
kernels by total GPU time and a summary by kind (matmul, attention, elementwise, optimizer, ...).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM

from .synthetic import PRETRAIN, make_batch, to_device

KINDS = (("attention", ("_attn_", "flash", "_fwd_kernel", "_bwd_")), ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet")),
         ("optimizer", ("adam",)), ("layernorm/geglu (triton)", ("_ln_", "geglu", "layer_norm", "_dropout_add")),
         ("loss/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
         ("copy/cast", ("copy", "cast", "convert", "to_copy")), ("index/gather", ("index", "gather", "scatter")))


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, keys in KINDS:
        if any(k in lower for k in keys):
            return kind
    return "other elementwise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("base")).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = [to_device(make_batch(PRETRAIN, args.batch, 30522, seed=i)["packed"], torch.device("cuda"))
               for i in range(3)]

    def step(batch: dict) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(8):
        step(batches[i % 3])
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(batches[i % 3])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    per_kernel = sorted(((e.key, e.self_device_time_total / steps / 1e3, e.count // steps) for e in events
                         if e.self_device_time_total > 0), key=lambda x: -x[1])
    total = sum(t for _, t, _ in per_kernel)
    by_kind: dict[str, float] = defaultdict(float)
    for name, t, _ in per_kernel:
        by_kind[kind_of(name)] += t
    print(f"\nGPU time per step: {total:.2f} ms (batch {args.batch}, kernels summed)")
    print(f"{'kind':<28}{'ms/step':>9}{'share':>8}")
    for kind, t in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"{kind:<28}{t:>9.2f}{t / total:>8.1%}")
    print(f"\n{'kernel':<90}{'ms/step':>9}{'calls':>7}")
    for name, t, calls in per_kernel[:args.rows]:
        print(f"{name[:88]:<90}{t:>9.3f}{calls:>7}")


if __name__ == "__main__":
    main()
