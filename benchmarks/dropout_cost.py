"""What dropout and the exact GELU cost in the fused GeGLU and LayerNorm kernels.

    python -m benchmarks.dropout_cost [--tokens 28835] [--bandwidth-tbps 4.2] [--out dropout.json]

MosaicBERT-Base shapes of one micro batch of 256 x 128 (about 28.8k real tokens): GeGLU on
(T, 2 x 3072) with the exact (erf) or tanh GELU, each without dropout and with p = 0.1;
dropout + add + LayerNorm on (T, 768) with the linear bias, p = 0 and 0.1. Each kernel is timed
alone, forward and backward apart, as the median GPU time per call over CUDA-graph replays (the
harness of benchmarks.fused_tiling). "floor" is the forward's bytes (each input read once, the
output written once) at the given memory bandwidth: the time a purely memory-bound kernel needs.
The last line times a plain device copy of the GeGLU input's size, the bandwidth actually reached.
"""

from __future__ import annotations

import argparse

import torch

from .fused_tiling import backward_case, forward_case, graph_time_ms
from .provenance import describe, write_result


def measure(tokens: int, bandwidth: float) -> dict:
    from mosaicbert_ds.kernels import fused

    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        return t.requires_grad_() if grad else t

    h, d_ff = randn(tokens, 6144, grad=True), randn(tokens, 3072)
    x, r, d_h = randn(tokens, 768, grad=True), randn(tokens, 768, grad=True), randn(tokens, 768)
    w = torch.ones(768, device="cuda", requires_grad=True)
    b = torch.zeros(768, device="cuda", requires_grad=True)
    lb = torch.zeros(768, device="cuda", requires_grad=True)
    rows = []
    for approx in ("none", "tanh"):
        for p in (0.0, 0.1):

            def f(approx: str = approx, p: float = p) -> torch.Tensor:
                return fused.geglu(h, approx, p)

            rows.append(
                {
                    "kernel": "geglu",
                    "gelu": approx,
                    "p": p,
                    "fwd_ms": graph_time_ms(forward_case(f)),
                    "bwd_ms": graph_time_ms(backward_case(f, [h], d_ff)),
                    "fwd_floor_ms": tokens * (6144 + 3072) * 2 / bandwidth * 1e3,
                }
            )
    for p in (0.0, 0.1):

        def f(p: float = p) -> torch.Tensor:
            return fused.dropout_add_layer_norm(x, r, w, b, 1e-12, p, True, lb)

        rows.append(
            {
                "kernel": "dropout_add_layer_norm",
                "gelu": None,
                "p": p,
                "fwd_ms": graph_time_ms(forward_case(f)),
                "bwd_ms": graph_time_ms(backward_case(f, [x, r, w, b, lb], d_h)),
                "fwd_floor_ms": tokens * 768 * 2 * 4 / bandwidth * 1e3,
            }
        )
    src = torch.empty(tokens * 6144, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = graph_time_ms(lambda: lambda: dst.copy_(src))
    return {
        "device": torch.cuda.get_device_name(),
        "tokens": tokens,
        "rows": rows,
        "copy": {"bytes": src.numel() * 2, "ms": copy_ms, "tbps": 2 * src.numel() * 2 / copy_ms / 1e9},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=28835, help="rows: real tokens of one micro batch")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.2, help="memory bandwidth for the floor column")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.dropout_cost needs a CUDA GPU")
    result = measure(args.tokens, args.bandwidth_tbps * 1e12)
    print(f"{result['device']}, {args.tokens} tokens; ms per call")
    print(f"{'kernel':32s}{'fwd ms':>9s}{'bwd ms':>9s}{'fwd floor ms':>14s}")
    for row in result["rows"]:
        name = row["kernel"] + (f" {row['gelu']}" if row["gelu"] else "") + f" p={row['p']}"
        print(f"{name:32s}{row['fwd_ms']:9.4f}{row['bwd_ms']:9.4f}{row['fwd_floor_ms']:14.4f}")
    c = result["copy"]
    print(f"copy of {c['bytes'] / 1e6:.0f} MB: {c['ms']:.4f} ms = {c['tbps']:.2f} TB/s (read + write)")
    if args.out:
        print(describe(write_result(args.out, result)["provenance"]))


if __name__ == "__main__":
    main()
