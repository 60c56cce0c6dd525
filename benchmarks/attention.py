"""Varlen ALiBi attention on one GPU: the Triton kernel against FlexAttention and PyTorch SDPA.

    python -m benchmarks.attention --out attention.json
    python -m benchmarks.attention --lengths 512,1024,2048,4096,8192 --out attention_long.json
    MOSAICBERT_FLASH_CANDIDATES=wide python -m benchmarks.attention --lengths 2048 --no-baselines

Three C4-like regimes of about 32k real tokens per call, 12 heads of 64, bf16: max_seqlen 128
(75% of rows full, the rest uniform 8..127), 512 (half full, rest 8..511) and 2048 (all full).
`--lengths` times full sequences of each length instead (the same total tokens per call, so
4 sequences of 8192 or 64 of 512) and ends with the long-input target: the Triton kernel's
forward+backward at least TARGET_VS_FLEX times as fast as FlexAttention's at every length.
MOSAICBERT_FLASH_CANDIDATES=wide makes the kernel's tuner time a wide grid of block shapes
(kernels/flash_attn.py: wide_fwd_candidates, wide_bwd_candidates) and this benchmark prints every
timing, to choose the candidate lists from.
Each method runs forward and forward+backward on the same data, laid out as it wants it
(prepared outside the timing, so the baselines are not charged for re-padding):
  triton      flash_attn_varlen_qkvpacked_func on the packed (T, 3, H, D) qkv, as in the model
  triton_reach  the same with MOSAICBERT_FLASH_ALIBI_REACH=1 (blocks beyond ALiBi's reach, whose
              terms are below 2^-40 of their row's largest, skipped; from max_seqlen 512)
  flex        FlexAttention, torch.compile'd, document mask + ALiBi score_mod on (1, H, T, D)
  sdpa_bias   SDPA on the re-padded (B, H, L, D) batch with an additive ALiBi + padding bias
  sdpa_flash  SDPA's flash path on the re-padded batch, no bias at all (not the same function:
              a speed reference only)
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs) after a
warm-up that compiles and autotunes, launched eagerly from Python as in training ("eager"), and
of do_bench_cudagraph ("graph": replays of a captured graph, so the GPU time alone: at 128
tokens the eager figures of every method are bound by the host's launch overhead).
TFLOP/s counts attention FLOPs over real token pairs only: 4 * sum(L_i^2) * H * D forward,
2.5 times that backward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from .provenance import write_result

N_HEADS, HEAD_DIM = 12, 64
DEVICE = "cuda"


@dataclass(frozen=True)
class Regime:
    name: str
    max_seqlen: int
    full_fraction: float
    min_len: int = 8


REGIMES = [Regime("128", 128, 0.75), Regime("512", 512, 0.5), Regime("2048", 2048, 1.0)]
TARGET_VS_FLEX = 1.5
"""The long-input target: triton fwd+bwd at least this many times as fast as FlexAttention's."""


def full_regime(length: int) -> Regime:
    """Every sequence exactly `length` tokens (the last one cut to the total)."""
    return Regime(f"L{length}", length, 1.0)


def regime_lengths(regime: Regime, total_tokens: int = 32768, seed: int = 0) -> list[int]:
    """Sequence lengths summing to total_tokens: full rows with probability full_fraction, the
    rest uniform in [min_len, max_seqlen - 1]; the last row is cut to fit. The first row is full,
    so max(lengths) == max_seqlen."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total_tokens
    while left > 0:
        full = not lengths or torch.rand((), generator=g).item() < regime.full_fraction
        n = regime.max_seqlen if full else int(torch.randint(regime.min_len, regime.max_seqlen, (), generator=g))
        lengths.append(min(n, left))
        left -= lengths[-1]
    return lengths


def attention_flops(lengths: list[int], n_heads: int = N_HEADS, head_dim: int = HEAD_DIM) -> float:
    """Forward FLOPs over real pairs: QK^T and PV, 2 * L^2 * D each, per head."""
    return 4.0 * sum(n * n for n in lengths) * n_heads * head_dim


@contextlib.contextmanager
def alibi_reach_on() -> Iterator[None]:
    """The kernel's ALiBi reach for the calls inside (the kernels read the variable per call)."""
    before = os.environ.get("MOSAICBERT_FLASH_ALIBI_REACH")
    os.environ["MOSAICBERT_FLASH_ALIBI_REACH"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MOSAICBERT_FLASH_ALIBI_REACH"]
        else:
            os.environ["MOSAICBERT_FLASH_ALIBI_REACH"] = before


def _bench(fn: Callable[[], object], grads: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def _bench_graph(fn: Callable[[], object], grads: list[torch.Tensor] | None = None) -> float | None:
    """Median ms of fn replayed from a CUDA graph: GPU time without the host's launch gaps."""
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=20, grad_to_none=grads, return_mode="median"))
    except Exception as exc:  # a method that cannot be captured gets no graph figure
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the memory ceiling."""
    x = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


class Methods:
    """The four methods on one regime's data, each a (forward, forward+backward) pair."""

    def __init__(self, lengths: list[int], flex_fn: Callable, seed: int = 0) -> None:
        from mosaicbert_ds.attention import alibi_bias, alibi_slopes
        from mosaicbert_ds.padding import cu_seqlens_from_lengths

        dev = torch.device(DEVICE)
        g = torch.Generator(device=dev).manual_seed(seed)
        self.lengths = lengths
        total, batch, width = sum(lengths), len(lengths), max(lengths)
        self.cu = cu_seqlens_from_lengths(torch.tensor(lengths)).to(dev)
        self.max_seqlen = width
        self.slopes = alibi_slopes(N_HEADS).to(dev)
        self.qkv = torch.randn(total, 3, N_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        self.qkv.requires_grad_(True)
        self.dout = torch.randn(total, N_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)

        # padded (B, H, L, D) copies and the additive bias for SDPA
        lens = torch.tensor(lengths, device=dev)
        valid = torch.arange(width, device=dev)[None, :] < lens[:, None]  # (B, L)
        self.valid = valid
        pad = torch.zeros(batch, width, 3, N_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        pad[valid] = self.qkv.detach()
        self.pq, self.pk, self.pv = (pad[:, :, i].transpose(1, 2).contiguous().requires_grad_(True) for i in range(3))
        dpad = torch.zeros(batch, width, N_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        dpad[valid] = self.dout
        self.pdout = dpad.transpose(1, 2).contiguous()
        neg = torch.finfo(torch.bfloat16).min
        alibi = alibi_bias(self.slopes, width).to(torch.bfloat16)[None]
        if bool(valid.all()):  # no padding: one (1, H, L, L) bias broadcast over the batch (8192: 1.6 GB)
            self.bias = alibi.contiguous()
        else:
            self.bias = ((~valid)[:, None, None, :].to(torch.bfloat16) * neg + alibi).contiguous()

        # packed (1, H, T, D) for FlexAttention
        self.fq, self.fk, self.fv = (
            self.qkv.detach()[:, i].transpose(0, 1)[None].contiguous().requires_grad_(True) for i in range(3)
        )
        self.fdout = self.dout.transpose(0, 1)[None].contiguous()
        self.flex_fn = flex_fn

    def triton(self) -> torch.Tensor:
        from mosaicbert_ds.kernels import flash_attn_varlen_qkvpacked_func

        return flash_attn_varlen_qkvpacked_func(self.qkv, self.cu, self.max_seqlen, alibi_slopes=self.slopes)

    def triton_reach(self) -> torch.Tensor:
        with alibi_reach_on():
            return self.triton()

    def flex(self) -> torch.Tensor:
        return self.flex_fn(self.fq, self.fk, self.fv)

    def sdpa_bias(self) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(self.pq, self.pk, self.pv, attn_mask=self.bias)

    def sdpa_flash(self) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(self.pq, self.pk, self.pv)

    def pairs(self) -> dict[str, tuple[Callable[[], object], Callable[[], object], list[torch.Tensor]]]:
        def fb(fwd: Callable[[], torch.Tensor], dout: torch.Tensor) -> Callable[[], None]:
            return lambda: fwd().backward(dout)

        def fb_reach() -> None:
            with alibi_reach_on():
                self.triton().backward(self.dout)

        return {
            "triton": (self.triton, fb(self.triton, self.dout), [self.qkv]),
            "triton_reach": (self.triton_reach, fb_reach, [self.qkv]),
            "flex": (self.flex, fb(self.flex, self.fdout), [self.fq, self.fk, self.fv]),
            "sdpa_bias": (self.sdpa_bias, fb(self.sdpa_bias, self.pdout), [self.pq, self.pk, self.pv]),
            "sdpa_flash": (self.sdpa_flash, fb(self.sdpa_flash, self.pdout), [self.pq, self.pk, self.pv]),
        }

    def agreement(self) -> dict[str, float]:
        """Relative error of the triton and flex outputs against SDPA+bias on the real tokens."""
        with torch.no_grad():
            ref = self.sdpa_bias().transpose(1, 2)[self.valid].float()  # (T, H, D)
            out = {
                "triton": self.triton().float(),
                "triton_reach": self.triton_reach().float(),
                "flex": self.flex()[0].transpose(0, 1).float(),
            }
            return {k: float((v - ref).norm() / ref.norm()) for k, v in out.items()}


def make_flex(total: int, slopes: torch.Tensor) -> tuple[Callable, Callable[[list[int]], None]]:
    """A compiled FlexAttention call on (1, H, total, D) and a setter for the document layout.

    The document ids live in one buffer updated in place, so a new regime is a new block mask,
    not a recompile. Within a document |i - j| equals the distance of the packed indices.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.zeros(total, dtype=torch.int32, device=DEVICE)
    state: dict[str, object] = {}

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    compiled = torch.compile(flex_attention, dynamic=False)

    def set_lengths(lengths: list[int]) -> None:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        doc.copy_(ids.to(doc.device, torch.int32))
        state["mask"] = create_block_mask(mask_mod, 1, 1, total, total, device=DEVICE)

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, score_mod=score_mod, block_mask=state["mask"])

    return call, set_lengths


def run(total_tokens: int, regimes: list[Regime], baselines: bool, profile_host: bool = False) -> dict:
    from mosaicbert_ds.attention import alibi_slopes
    from mosaicbert_ds.kernels import flash_attn

    torch.manual_seed(0)
    bandwidth = _copy_bandwidth()
    slopes = alibi_slopes(N_HEADS).to(DEVICE)
    flex_fn, set_lengths = make_flex(total_tokens, slopes) if baselines else (None, None)
    results = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "regimes": [],
    }
    for regime in regimes:
        lengths = regime_lengths(regime, total_tokens)
        if baselines:
            set_lengths(lengths)
        m = Methods(lengths, flex_fn)
        fwd_flops = attention_flops(lengths)
        # bytes that must move at least: q, k, v, out (+ dout, dq, dk, dv, out again for backward)
        tensor_bytes = sum(lengths) * N_HEADS * HEAD_DIM * 2
        floor_fwd_ms = 4 * tensor_bytes / bandwidth * 1e3
        floor_fb_ms = floor_fwd_ms + 8 * tensor_bytes / bandwidth * 1e3
        row = {
            "regime": asdict(regime),
            "sequences": len(lengths),
            "tokens": sum(lengths),
            "fwd_gflop": fwd_flops / 1e9,
            "floor_fwd_ms": floor_fwd_ms,
            "floor_fwd_bwd_ms": floor_fb_ms,
            "methods": {},
        }
        pairs = m.pairs()
        if regime.max_seqlen < 512:  # the reach starts at 512 (kernels/flash_attn.py REACH_MIN_SEQLEN)
            pairs.pop("triton_reach")
        if not baselines:
            pairs = {k: v for k, v in pairs.items() if k.startswith("triton")}
        for name, (fwd, fwd_bwd, grads) in pairs.items():
            fwd_bwd()  # warm-up: compile, tune
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t_fwd, t_fb = _bench(fwd), _bench(fwd_bwd, grads)
            g_fwd, g_fb = _bench_graph(fwd), _bench_graph(fwd_bwd, grads)
            row["methods"][name] = {
                "fwd_ms": t_fwd,
                "fwd_bwd_ms": t_fb,
                "fwd_tflops": fwd_flops / t_fwd / 1e9,
                "fwd_bwd_tflops": 3.5 * fwd_flops / t_fb / 1e9,
                "graph_fwd_ms": g_fwd,
                "graph_fwd_bwd_ms": g_fb,
            }
        if baselines:
            row["rel_err_vs_sdpa_bias"] = m.agreement()
        if profile_host:  # where the host time of one eager forward+backward goes
            import cProfile
            import pstats

            fwd_bwd = pairs["triton"][1]
            with cProfile.Profile() as prof:
                for _ in range(50):
                    fwd_bwd()
                torch.cuda.synchronize()
            print(f"host profile, 50 x triton fwd+bwd at {regime.name}:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        row["triton_configs"] = {
            str(k): str(v)
            for k, v in flash_attn.chosen_configs().items()
            if k[1] == flash_attn._bucket(regime.max_seqlen)
        }
        row["triton_tuning_ms"] = {
            str(k): [(str(c), round(t, 4)) for c, t in v]
            for k, v in flash_attn.tuning_timings().items()
            if k[1] == flash_attn._bucket(regime.max_seqlen)
        }
        results["regimes"].append(row)
        del m
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return results


def target_lines(results: dict) -> list[str]:
    """The long-input target per regime from 512 tokens up: triton (and triton_reach) vs flex,
    eager fwd+bwd."""
    lines = []
    for row in results["regimes"]:
        methods = row["methods"]
        if row["regime"]["max_seqlen"] < 512 or "flex" not in methods:
            continue
        for name in ("triton", "triton_reach"):
            if name not in methods:
                continue
            ratio = methods["flex"]["fwd_bwd_ms"] / methods[name]["fwd_bwd_ms"]
            verdict = "meets" if ratio >= TARGET_VS_FLEX else "MISSES"
            lines.append(
                f"target {row['regime']['name']}: {name} fwd+bwd {ratio:.2f}x FlexAttention's "
                f"({verdict} the {TARGET_VS_FLEX}x target)"
            )
    return lines


def table(results: dict) -> str:
    def ms(x: float | None) -> str:
        return f"{x:8.3f}" if x is not None else f"{'-':>8}"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:6.2f}" if a is not None and b is not None else f"{'-':>6}"

    lines = [
        f"{results['device']}, torch {results['torch']}, copy {results['copy_bandwidth_TBps']:.2f} TB/s; "
        f"bf16, {N_HEADS} heads x {HEAD_DIM}; median ms (eager: launched from Python as in training; "
        "graph: CUDA-graph replay, GPU time only); TFLOP/s over real pairs, eager; x = method / triton",
        f"{'regime':>6} {'method':>12} {'fwd':>8} {'f+b':>8} {'fwd TF/s':>8} {'f+b TF/s':>8} "
        f"{'g fwd':>8} {'g f+b':>8} {'x fwd':>6} {'x f+b':>6} {'xg f+b':>6}",
    ]
    for row in results["regimes"]:
        ours = row["methods"]["triton"]
        for name, r in row["methods"].items():
            lines.append(
                f"{row['regime']['name']:>6} {name:>12} {ms(r['fwd_ms'])} {ms(r['fwd_bwd_ms'])} "
                f"{r['fwd_tflops']:8.1f} {r['fwd_bwd_tflops']:8.1f} {ms(r['graph_fwd_ms'])} "
                f"{ms(r['graph_fwd_bwd_ms'])} {ratio(r['fwd_ms'], ours['fwd_ms'])} "
                f"{ratio(r['fwd_bwd_ms'], ours['fwd_bwd_ms'])} "
                f"{ratio(r['graph_fwd_bwd_ms'], ours['graph_fwd_bwd_ms'])}"
            )
        lines.append(
            f"{row['regime']['name']:>6} {'floor':>12} {ms(row['floor_fwd_ms'])} {ms(row['floor_fwd_bwd_ms'])}"
            "   (memory: each tensor read or written once)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--tokens", type=int, default=32768, help="real tokens per call")
    parser.add_argument("--regimes", default="128,512,2048", help="comma-separated subset of 128,512,2048")
    parser.add_argument(
        "--lengths",
        default=None,
        help="full sequences of these lengths instead of the regimes, e.g. 512,1024,2048,4096,8192",
    )
    parser.add_argument("--no-baselines", action="store_true", help="time the Triton kernel only")
    parser.add_argument("--profile-host", action="store_true", help="cProfile the eager Triton calls")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention needs a CUDA GPU")
    if args.lengths:
        regimes = [full_regime(int(n)) for n in args.lengths.split(",")]
    else:
        names = args.regimes.split(",")
        regimes = [r for r in REGIMES if r.name in names]
    results = run(args.tokens, regimes, not args.no_baselines, args.profile_host)
    results["target_vs_flex"] = TARGET_VS_FLEX
    if args.out:
        write_result(args.out, results)
    print(table(results))
    for line in target_lines(results):
        print(line)
    for row in results["regimes"]:  # what the tuner saw, for choosing the candidate lists
        for key, timings in row["triton_tuning_ms"].items():
            print(row["regime"]["name"], key, " ".join(f"{c}={t:.3f}" for c, t in timings))


if __name__ == "__main__":
    main()
