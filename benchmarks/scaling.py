"""Scaling on one host: the trainer on N GPUs, weak and strong, and the all-reduce bus bandwidth.

Run once per GPU count under a launcher, then merge:

    deepspeed --num_gpus 2 --no_local_rank --module benchmarks.scaling --out scaling_w2.json
    python -m benchmarks.scaling --merge scaling_w1.json scaling_w2.json scaling_w4.json --out scaling.json

Weak scaling keeps the shipped 8-GPU config's per-GPU work (512 sequences per GPU per step, as
micro 256 x accumulation 2 by default: on an H200 micro 128 leaves the GPU waiting on the host)
and grows the global batch with N; strong scaling keeps the global batch at the paper's 4096 and
shrinks the accumulation. On one GPU the script also separates the time of one micro batch
(forward + backward) from the optimizer step (steps with accumulation 1 and 512 / micro), which
the scaling model needs. The all-reduce is timed on a buffer of the model's gradient
size in bf16 and fp32; bus bandwidth = 2 (n - 1) / n x bytes / time, NCCL's convention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.flops import mfu, paper_flops_per_token, peak_flops
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.engine import build_engine
from mosaicbert_ds.train.step import Window, train_step

from .provenance import write_result
from .synthetic import PRETRAIN, make_batch

PER_GPU = 512  # sequences per GPU per step: ds_configs/mosaicbert-base_8gpu.json, 512 x 8 = 4096
GLOBAL = 4096


def allreduce_busbw(n_elements: int, dtype: torch.dtype, iters: int = 20) -> dict[str, Any]:
    world = dist.get_world_size()
    buf = torch.randn(n_elements, device="cuda").to(dtype)
    for _ in range(5):
        dist.all_reduce(buf)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        dist.all_reduce(buf)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    nbytes = n_elements * buf.element_size()
    busbw = 2 * (world - 1) / world * nbytes / seconds if world > 1 else float("nan")
    return {
        "world_size": world,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes": nbytes,
        "seconds": seconds,
        "busbw_gbps": busbw / 1e9,
    }


def run_steps(config: MosaicBertConfig, micro: int, accum: int, warmup: int, steps: int) -> dict[str, Any]:
    world = dist.get_world_size()
    ds_config = build_ds_config(global_batch=micro * accum * world, micro_batch=micro, world_size=world, lr=5e-4)
    engine, n_params = build_engine(config, ds_config, total_steps=10**6, warmup_fraction=0.06, final_lr_ratio=0.02)
    rank = dist.get_rank()
    data = [make_batch(PRETRAIN, micro, vocab=30522, seed=1000 * rank + i)["packed"] for i in range(6)]

    def batches():
        while True:
            yield from data

    it = batches()
    window = Window(engine.device)
    for _ in range(warmup):
        train_step(engine, it, accum, world, window, config)
    torch.cuda.synchronize()
    dist.barrier()
    window.reset()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, it, accum, world, window, config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = torch.tensor(float(window.tokens), device="cuda")
    dist.all_reduce(tokens)
    del engine
    torch.cuda.empty_cache()
    tps = tokens.item() / seconds
    return {
        "world_size": world,
        "global_batch": micro * accum * world,
        "micro_batch": micro,
        "accumulation": accum,
        "real_tokens_per_sec": tps,
        "step_time_sec": seconds / steps,
        "params": n_params,
        "mfu": mfu(paper_flops_per_token(n_params) * tps, world, peak_flops()),
    }


def measure(warmup: int, steps: int, micro: int = 256) -> dict[str, Any]:
    from mosaicbert_ds.train.distributed import init_distributed

    init_distributed()
    world = dist.get_world_size()
    config = MosaicBertConfig.from_name("base")
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "model": "base",
        "points": [],
        "allreduce": [],
        "micro_batch": micro,
    }
    accum = PER_GPU // micro
    weak = run_steps(config, micro, accum, warmup, steps)
    out["points"].append({**weak, "mode": "weak"})
    out["params"] = weak["params"]
    strong = run_steps(config, micro, GLOBAL // (micro * world), warmup, max(2, steps // 4))
    out["points"].append({**strong, "mode": "strong"})
    if world == 1:  # separate micro-batch compute from the optimizer step
        one = run_steps(config, micro, 1, warmup, steps)
        micro_sec = (weak["step_time_sec"] - one["step_time_sec"]) / (accum - 1)
        out["compute_sec_per_micro"] = micro_sec
        out["optimizer_sec"] = one["step_time_sec"] - micro_sec
    else:
        for dtype in (torch.bfloat16, torch.float32):
            out["allreduce"].append(allreduce_busbw(out["params"], dtype))
    return out


def merge(paths: list[str]) -> dict[str, Any]:
    parts = [json.load(open(p)) for p in paths]
    merged = {
        "device": parts[0]["device"],
        "model": "base",
        "points": [],
        "allreduce": [],
        "micro_batch": parts[0].get("micro_batch", 128),
    }
    for part in parts:
        merged["points"] += part["points"]
        merged["allreduce"] += part["allreduce"]
        for key in ("compute_sec_per_micro", "optimizer_sec", "params"):
            if key in part:
                merged[key] = part[key]
    one = {p["mode"]: p for p in merged["points"] if p["world_size"] == 1}
    for p in merged["points"]:
        base = one.get(p["mode"])
        if base:  # tokens/s relative to N x the 1-GPU figure
            p["efficiency"] = p["real_tokens_per_sec"] / (p["world_size"] * base["real_tokens_per_sec"])
    return merged


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nscaling on one host ({result['device']}, MosaicBERT-Base, micro {result.get('micro_batch', 128)}, "
        "C4-like lengths)"
    )
    print(
        f"{'GPUs':>5}{'mode':>8}{'global':>8}{'accum':>7}{'real tok/s':>13}{'step ms':>10}{'MFU':>7}{'efficiency':>12}"
    )
    for p in sorted(result["points"], key=lambda p: (p["mode"], p["world_size"])):
        eff = f"{p['efficiency']:.1%}" if "efficiency" in p else "-"
        print(
            f"{p['world_size']:>5}{p['mode']:>8}{p['global_batch']:>8}{p['accumulation']:>7}"
            f"{p['real_tokens_per_sec']:>13,.0f}{p['step_time_sec'] * 1e3:>10.1f}{p['mfu']:>7.1%}{eff:>12}"
        )
    for a in result["allreduce"]:
        print(
            f"all-reduce {a['dtype']:>8} {a['bytes'] / 1e6:8.0f} MB on {a['world_size']} GPUs: "
            f"{a['seconds'] * 1e3:.2f} ms, bus bandwidth {a['busbw_gbps']:.0f} GB/s"
        )
    if "compute_sec_per_micro" in result:
        print(
            f"1 GPU: {result['compute_sec_per_micro'] * 1e3:.1f} ms per micro batch (fwd+bwd), "
            f"{result['optimizer_sec'] * 1e3:.1f} ms per optimizer step"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="scaling.json")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--micro",
        type=int,
        default=256,
        choices=(128, 256, 512),
        help="micro batch; accumulation makes up 512 sequences per GPU",
    )
    parser.add_argument("--merge", nargs="*", help="merge per-world-size JSON files instead of measuring")
    args = parser.parse_args()
    if args.merge:
        result = merge(args.merge)
        print_table(result)
    else:
        result = measure(args.warmup, args.steps, args.micro)
        if dist.get_rank() != 0:
            return
        print_table(result)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
