"""Where an optimizer step of the real trainer spends its time (DeepSpeed engine, `train_step`).

    python -m benchmarks.profile_trainer --micro 64 --accum 8 [--graphs]

The engine and synthetic batches are those of benchmarks.throughput. Prints, per optimizer step:
the wall time in steady state; the host's time to issue the step while the GPU is kept busy (so
launches never wait on it: near the wall time means the step is bound by the host); the GPU's busy
and idle time and kernel count (a GPU-only profile, which adds little host time); GPU time by kind
of kernel; and, from a second profile with the host side on, the host ops that cost the most.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.train.graphed_engine_step import GraphedEngineStep
from mosaicbert_ds.train.step import Window, train_step

from .profile_step import idle_gaps, kind_of
from .provenance import describe, provenance
from .throughput import trainer_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--graphs", action="store_true")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from mosaicbert_ds.train.distributed import init_distributed

    init_distributed()
    print(describe(provenance()))
    config = MosaicBertConfig.from_name("base")
    engine, batches, _ = trainer_setup(config, args.micro, args.accum, batched_optimizer=args.graphs)
    graphed = GraphedEngineStep(engine) if args.graphs else None
    window = Window(engine.device)

    def step() -> None:
        train_step(engine, batches, args.accum, 1, window, config, graphed)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    window.reset()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    tokens = window.tokens / args.steps
    torch.cuda._sleep(int(2e9))  # ~1 s of queued GPU work: the next step's launches never wait on it
    start = time.perf_counter()
    step()
    issue = time.perf_counter() - start
    torch.cuda.synchronize()
    label = f"micro {args.micro} x {args.accum}{', CUDA graphs' if args.graphs else ', eager'}"
    print(
        f"\n{label}: wall {wall * 1e3:.2f} ms/step, {tokens / wall:,.0f} real tokens/s; host issue "
        f"{issue * 1e3:.2f} ms/step ({issue / wall:.0%} of wall)"
    )

    n = 2
    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gaps, busy, span = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in events])
    print(
        f"GPU per step: span {span / n / 1e3:.2f} ms, busy {busy / n / 1e3:.2f} ms, idle "
        f"{(span - busy) / n / 1e3:.2f} ms; {len(events) // n} kernels/copies"
    )
    by_kind: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        t = (e.time_range.end - e.time_range.start) / n / 1e3
        by_kind[kind_of(e.name)] += t
        per_kernel[e.name][0] += t
        per_kernel[e.name][1] += 1 / n
    total = sum(by_kind.values())
    print(f"{'kind':<28}{'ms/step':>9}{'share':>8}")
    for kind, t in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"{kind:<28}{t:>9.2f}{t / total:>8.1%}")
    print(f"\n{'kernel':<90}{'ms/step':>9}{'calls':>7}")
    for name, (t, calls) in sorted(per_kernel.items(), key=lambda x: -x[1][0])[: args.rows]:
        print(f"{name[:88]:<90}{t:>9.3f}{calls:>7.0f}")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    cpu = sorted(
        ((e.key, e.self_cpu_time_total / n / 1e3, e.count / n) for e in prof.key_averages()),
        key=lambda x: -x[1],
    )
    print(f"\nhost: {sum(t for _, t, _ in cpu):.2f} ms/step of op self time (profiled)")
    print(f"{'op (host self time)':<90}{'ms/step':>9}{'calls':>7}")
    for name, t, calls in cpu[: args.rows]:
        print(f"{name[:88]:<90}{t:>9.3f}{calls:>7.0f}")


if __name__ == "__main__":
    main()
