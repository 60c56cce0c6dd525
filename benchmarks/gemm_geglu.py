"""GeGLU in the MLP's GEMM epilogues against cuBLAS + the fused GeGLU kernel, at MosaicBERT-Base shapes.

    python -m benchmarks.gemm_geglu [--tokens 28835] [--out gemm_geglu.json]

Forward: h = x @ Wi^T (T x 768 by 768 x 6144) then GeGLU with dropout 0.1, as cuBLAS + the GeGLU
kernel (kernels.fused) and as one Triton kernel (kernels.gemm_geglu.linear_geglu). Backward: the
GeGLU's input gradient from Wo's output gradient, dy @ Wo (T x 768 by 768 x 3072) then the GeGLU
backward, against kernels.gemm_geglu.geglu_dgrad. Every tile candidate is timed (median ms per
call over CUDA-graph replays of 20 calls) and checked against the unfused result, masks included.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .fused_tiling import _time

def _tiles(tiles: list[tuple[int, ...]], **flags: bool) -> list[dict]:
    return [dict(bm=m, bn=n, bk=k, stages=s, warps=w, **flags) for m, n, k, s, w in tiles]


# (bm, bn, bk, stages, warps) candidates: grid of TMA tiles, then persistent without and with Triton's warp
# specialization
_F = [(128, 64, 64, 3, 8), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (128, 128, 64, 4, 8)]
_D = [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8)]
FORWARD = (_tiles(_F[:1], tma=True) + _tiles(_F, persistent=True)
           + _tiles(_F, persistent=True, warp_specialize=True))
DGRAD = (_tiles(_D[:1], tma=True) + _tiles(_D, persistent=True)
         + _tiles(_D, persistent=True, warp_specialize=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    from mosaicbert_ds.kernels import fused
    from mosaicbert_ds.kernels import gemm_geglu as gg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=28835, help="rows: real tokens of one micro batch")
    parser.add_argument("--p", type=float, default=0.1, help="GLU dropout")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    T, d, ff, p = args.tokens, 768, 3072, args.p
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    x = torch.randn(T, d, device="cuda", dtype=bf16, generator=g)
    wi = torch.randn(2 * ff, d, device="cuda", dtype=bf16, generator=g) * d ** -0.5
    wo = torch.randn(d, ff, device="cuda", dtype=bf16, generator=g) * ff ** -0.5
    dy = torch.randn(T, d, device="cuda", dtype=bf16, generator=g)
    h_ref = F.linear(x, wi).requires_grad_(True)
    torch.manual_seed(1)
    out_ref = fused.geglu(h_ref, "none", p)
    dh_ref, = torch.autograd.grad(out_ref, h_ref, dy @ wo, retain_graph=True)
    torch.manual_seed(1)
    _, _, seed = gg.linear_geglu(x, wi, "none", p)  # the reference's seed, drawn the same way
    h_det = h_ref.detach()

    rows = []

    def row(kind: str, name: str, ms: float, err: float | None = None) -> None:
        rows.append({"kind": kind, "name": name, "ms": ms, "rel_err": err})
        print(f"{kind:8s} {name:44s} {ms:8.4f} ms" + ("" if err is None else f"  err {err:.1e}"), flush=True)

    mm_f = _time(lambda: lambda: F.linear(x, wi))
    gl_f = _time(lambda: lambda: fused.geglu(h_det, "none", p))
    row("forward", "cuBLAS x @ Wi^T", mm_f)
    row("forward", "fused.geglu", gl_f)
    row("forward", "cuBLAS + fused.geglu", mm_f + gl_f)
    mm_b = _time(lambda: lambda: dy @ wo)
    dact = dy @ wo

    _, threshold, scale, _ = fused._dropout_args(p, h_det, draw=False)
    gl_b = _time(lambda: lambda: fused._geglu_backward(h_det, dact, False, threshold, scale, p > 0, seed))
    row("dgrad", "cuBLAS dy @ Wo", mm_b)
    row("dgrad", "fused.geglu backward", gl_b)
    row("dgrad", "cuBLAS + fused.geglu backward", mm_b + gl_b)
    for kind, space in (("forward", FORWARD), ("dgrad", DGRAD)):
        for fields in space:
            tile = gg.GemmTile(**fields)
            kind_of = "persistent" + (" ws" if tile.warp_specialize else "") if tile.persistent else (
                "tma" if tile.tma else "ptr")
            name = (f"{kind_of} {tile.bm}x{tile.bn}x{tile.bk} s{tile.stages} w{tile.warps}"
                    + (" prefetch" if tile.prefetch else ""))
            try:
                if kind == "forward":
                    h, out, _ = gg.linear_geglu(x, wi, "none", p, seed, tile=tile)
                    err = max(_rel(h, h_det), _rel(out, out_ref))
                    fn = lambda: gg.linear_geglu(x, wi, "none", p, seed, tile=tile)  # noqa: E731
                else:
                    err = _rel(gg.geglu_dgrad(dy, wo, h_det, "none", p, seed, tile=tile), dh_ref)
                    fn = lambda: gg.geglu_dgrad(dy, wo, h_det, "none", p, seed, tile=tile)  # noqa: E731
                row(kind, name, _time(lambda: fn), err)
            except Exception as e:  # out of shared memory or registers for this tile
                print(f"{kind:8s} {name}: {type(e).__name__}: {str(e)[:120]}")
    print(f"\n{torch.cuda.get_device_name()}, {T} tokens, p = {p}; ms per call")
    for kind, base in (("forward", mm_f + gl_f), ("dgrad", mm_b + gl_b)):
        fused_rows = [r for r in rows if r["kind"] == kind and r["rel_err"] is not None]
        best = min(fused_rows, key=lambda r: r["ms"])
        print(f"{kind:8s} unfused {base:.4f}  best fused {best['ms']:.4f} ({best['name']}, err {best['rel_err']:.1e})"
              f"  saving x12 layers {12 * (base - best['ms']):.3f} ms/step")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": T, "p": p, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
