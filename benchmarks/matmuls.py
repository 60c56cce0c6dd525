"""The training step's matmuls one by one: TFLOP/s of each GEMM at MosaicBERT-Base shapes.

    python -m benchmarks.matmuls [--tokens 28835] [--out matmuls.json]

Matmuls are about 60% of a step's GPU time (benchmarks.profile_step). This times each
projection's forward (x @ W^T), input gradient (dY @ W) and weight gradient (dY^T @ X, fp32 out
as mosaicbert_ds.ops._Linear writes it; also bf16 out, and the transposed product X^T @ dY) at the
step's token count and at that count rounded up to a multiple of 128, next to a large square
GEMM as the practical ceiling. Each figure: median over CUDA-graph replays of 20 calls, bf16
inputs. A GEMM well below its neighbours points at a layout or shape worth changing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from .fused_tiling import graph_time_ms as graph_time
from .provenance import write_result

# (name, in features, out features, rows): the layer's four projections at the step's token
# count; the MLM decoder runs on the masked tokens only (30% of them)
PROJECTIONS = (
    ("Wqkv", 768, 2304, 1.0),
    ("out_proj", 768, 768, 1.0),
    ("Wi", 768, 6144, 1.0),
    ("Wo", 3072, 768, 1.0),
    ("decoder", 768, 30528, 0.3),
)


def _time(fn: Callable[[], object], calls: int = 20) -> float:
    """Median ms per call over replays of a CUDA graph of `calls` calls."""
    return graph_time(lambda: fn, calls=calls)


def gemms(rows: int, d_in: int, d_out: int) -> dict[str, Callable[[], object]]:
    bf16, fp32 = torch.bfloat16, torch.float32
    x = torch.randn(rows, d_in, device="cuda", dtype=bf16)
    w = torch.randn(d_out, d_in, device="cuda", dtype=bf16)
    dy = torch.randn(rows, d_out, device="cuda", dtype=bf16)
    return {
        "forward x @ W^T": lambda: torch.nn.functional.linear(x, w),
        "input grad dY @ W": lambda: dy @ w,
        "weight grad dY^T @ X, fp32 out": lambda: torch.mm(dy.t(), x, out_dtype=fp32),
        "weight grad dY^T @ X, bf16 out": lambda: dy.t() @ x,
        "weight grad X^T @ dY, fp32 out": lambda: torch.mm(x.t(), dy, out_dtype=fp32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=28835, help="real tokens of one micro batch (256 x 128)")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    square = 8192
    a = torch.randn(square, square, device="cuda", dtype=torch.bfloat16)
    ceiling = 2 * square**3 / _time(lambda: a @ a, calls=5) / 1e9
    print(f"{torch.cuda.get_device_name()}: square {square} bf16 GEMM {ceiling:.0f} TFLOP/s\n")
    print(f"{'projection':10s}{'rows':>7s}  {'gemm':32s}{'ms':>8s}{'TFLOP/s':>9s}{'of square':>10s}")
    out = []
    for name, d_in, d_out, share in PROJECTIONS:
        for rows in sorted({round(args.tokens * share), -(-round(args.tokens * share) // 128) * 128}):
            for gemm, fn in gemms(rows, d_in, d_out).items():
                ms = _time(fn)
                tflops = 2 * rows * d_in * d_out / ms / 1e9
                out.append({"projection": name, "rows": rows, "gemm": gemm, "ms": ms, "tflops": tflops})
                print(f"{name:10s}{rows:7d}  {gemm:32s}{ms:8.4f}{tflops:9.0f}{tflops / ceiling:10.0%}")
    if args.out:
        write_result(args.out, {"device": torch.cuda.get_device_name(), "square_tflops": ceiling, "rows": out})


if __name__ == "__main__":
    main()
