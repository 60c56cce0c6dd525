"""Where a MosaicBERT-Base training step spends its GPU time (torch.profiler, one H200).

    python -m benchmarks.profile_step [--batch 256] [--finetune] [--graphs] [--gaps]

Same step as benchmarks.step (autocast bf16, fused AdamW, C4-like batch at 128, or the
finetuning-like mix). Prints the host's view first: the time per step in steady state (CUDA
events over five steps queued behind an untimed one), and the time the host needs just to issue
one step (measured while the GPU is kept busy by a long sleep kernel, so
launches never wait on the GPU): when issuing takes about as long as the step, the step is bound
by the host, not the GPU. Then the kernels by total GPU time and a summary by kind. --gaps
instead profiles the GPU alone (no CPU ranges, so that the profiler adds little host time) and
reports where the GPU sits idle between kernels: gaps by size, and the largest ones by place.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.graphed_mlm_step import GraphedMLMStep

from .provenance import describe, provenance
from .synthetic import FINETUNE, PRETRAIN, make_batch, to_device

# first match wins: the fused elementwise kernels' names also end in _fwd_kernel/_bwd_kernel
KINDS = (
    ("layernorm/geglu (triton)", ("_ln_", "geglu", "layer_norm", "_dal_", "_ce_", "cross_entropy")),
    ("attention", ("_attn_", "flash", "_fwd_kernel", "_bwd_")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet")),
    ("optimizer", ("adam",)),
    ("loss/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("copy/cast", ("copy", "cast", "convert", "to_copy")),
    ("index/gather", ("index", "gather", "scatter")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, keys in KINDS:
        if any(k in lower for k in keys):
            return kind
    return "other elementwise"


def host_view(step, batches: list[dict], n: int = 5) -> None:
    """Time per step in steady state (GPU clock), and the host's time to issue a step while the
    GPU is still busy."""
    torch.cuda.synchronize()
    # one untimed step first: timed from an idle GPU, the first forward would wait on the host
    step(batches[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        step(batches[(i + 1) % len(batches)])
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 1e3 / n
    # ~0.5 s of GPU work queued ahead, so the step's launches do not wait on the GPU; one step
    # only, since the launch queue holds about a thousand kernels before the host blocks anyway
    torch.cuda._sleep(int(1e9))
    start = time.perf_counter()
    step(batches[0])
    issue = time.perf_counter() - start
    torch.cuda.synchronize()
    print(
        f"wall {wall * 1e3:.2f} ms/step; host issue time {issue * 1e3:.2f} ms/step "
        f"({issue / wall:.0%} of the wall time; near 100% means host-bound)"
    )


def idle_gaps(spans: list[tuple[float, float, str]]) -> tuple[list[tuple[float, str, str]], float, float]:
    """From (start, end, name) of GPU activities (any order, possibly overlapping): the idle gaps
    as (length, activity before, activity after), the busy time and the whole span."""
    spans = sorted(spans)
    gaps, busy, end, prev = [], 0.0, spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, prev, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev = stop, name
    return gaps, busy, end - spans[0][0]


def gap_report(prof: profile, steps: int, top: int = 12) -> None:
    """Idle GPU time between consecutive kernels (memsets and copies included), per step."""
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA"]
    gaps, busy, span = idle_gaps(spans)
    idle = sum(g for g, *_ in gaps)
    print(
        f"\nGPU timeline per step: {span / steps / 1e3:.2f} ms, busy {busy / steps / 1e3:.2f}, "
        f"idle {idle / steps / 1e3:.2f} ms in {len(gaps) // steps} gaps; {len(spans) // steps} kernels/copies"
    )
    print(f"{'gap size (us)':<16}{'gaps/step':>10}{'ms/step':>9}")
    for lo, hi in ((0, 2), (2, 5), (5, 20), (20, 100), (100, float("inf"))):
        sel = [g for g, *_ in gaps if lo <= g < hi]
        print(f"{f'{lo}-{hi}':<16}{len(sel) / steps:>10.1f}{sum(sel) / steps / 1e3:>9.3f}")
    print(f"\nlargest gaps: {'us':>8}  after -> before")
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"{'':14}{g:>8.1f}  {a[:45]} -> {b[:45]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--finetune", action="store_true", help="the finetuning-like length mix")
    parser.add_argument(
        "--graphs", action="store_true", help="forward + backward as CUDA graphs (mosaicbert_ds.graphed_mlm_step)"
    )
    parser.add_argument("--gaps", action="store_true", help="only where the GPU idles between kernels")
    args = parser.parse_args()
    print(describe(provenance()))  # the log's first line: commit, dirty flag, versions, command
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("base")).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    mix = FINETUNE if args.finetune else PRETRAIN
    batches = [to_device(make_batch(mix, args.batch, 30522, seed=i)["packed"], torch.device("cuda")) for i in range(3)]

    graphed = GraphedMLMStep(model, autocast_dtype=torch.bfloat16, accumulate=False) if args.graphs else None

    def step(batch: dict) -> None:
        if graphed is not None:
            graphed(batch)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(8):
        step(batches[i % 3])
    torch.cuda.synchronize()
    host_view(step, batches)
    steps = 3
    if args.gaps:
        # a step queued first, unprofiled: the profiled ones then start with the GPU busy, as in training
        step(batches[2])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                step(batches[i % 3])
            torch.cuda.synchronize()
        gap_report(prof, steps)
        return
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(batches[i % 3])
        torch.cuda.synchronize()
    # kernels only: the CPU-side ops (aten::mm, autograd Functions) carry their kernels' time too,
    # and so do the GPU copies of host ranges such as "Optimizer.step#AdamW.step" (same name)
    host_ranges = {e.key for e in prof.key_averages() if e.device_type.name == "CPU"}
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.key not in host_ranges]
    per_kernel = sorted(
        (
            (e.key, e.self_device_time_total / steps / 1e3, e.count // steps)
            for e in events
            if e.self_device_time_total > 0
        ),
        key=lambda x: -x[1],
    )
    total = sum(t for _, t, _ in per_kernel)
    by_kind: dict[str, float] = defaultdict(float)
    for name, t, _ in per_kernel:
        by_kind[kind_of(name)] += t
    print(f"\nGPU time per step: {total:.2f} ms (batch {args.batch}, kernels summed)")
    print(f"{'kind':<28}{'ms/step':>9}{'share':>8}")
    for kind, t in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"{kind:<28}{t:>9.2f}{t / total:>8.1%}")
    print(f"\n{'kernel':<90}{'ms/step':>9}{'calls':>7}")
    for name, t, calls in per_kernel[: args.rows]:
        print(f"{name[:88]:<90}{t:>9.3f}{calls:>7}")
    # the host's side: ops by their own CPU time (the profiler adds a few microseconds to each)
    cpu = sorted(
        (
            (e.key, e.self_cpu_time_total / steps / 1e3, e.count // steps)
            for e in prof.key_averages()
            if e.device_type.name == "CPU" and e.self_cpu_time_total > 0
        ),
        key=lambda x: -x[1],
    )
    print(f"\nhost: {sum(t for _, t, _ in cpu):.2f} ms/step of op self time in {sum(c for *_, c in cpu)} op calls")
    print(f"{'op (host self time)':<90}{'ms/step':>9}{'calls':>7}")
    for name, t, calls in cpu[: args.rows]:
        print(f"{name[:88]:<90}{t:>9.3f}{calls:>7}")


if __name__ == "__main__":
    main()
