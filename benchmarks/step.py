"""A bare MosaicBERT training step on one GPU against transformers' BERT, in one run.

    python -m benchmarks.step --out step.json

Each configuration runs forward, backward and a fused AdamW step under bf16 autocast on the same
synthetic batches (benchmarks.synthetic: C4-like lengths, 30% masking), with warm-up (compile,
autotune) first and CUDA events around each step; the median step time over rotating batches is
reported. Real tokens/s counts only non-pad tokens; MFU is the paper's 6 * params * tokens/s over
the GPU's peak (mosaicbert_ds.flops). Baselines: BertForMaskedLM with SDPA, eager and compiled,
on the padded form of the same batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any, Callable

import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.flops import peak_flops

from .synthetic import FINETUNE, PRETRAIN, LengthMix, make_batch, to_device


def hf_bert(compile_model: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(attn_implementation="sdpa"))
    return torch.compile(model) if compile_model else model


def mosaic(compile_model: bool = False, **overrides: Any) -> torch.nn.Module:
    if compile_model:  # Inductor fuses the elementwise work itself; the attention kernel stays eager
        overrides.setdefault("fused_ops", False)
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("base", **overrides))
    if compile_model:
        for layer in model.bert.layers:
            layer.compile(dynamic=True)
    return model


def time_steps(model: torch.nn.Module, batches: list[dict], warmup: int, iters: int, accum: int = 1
               ) -> tuple[float, float]:
    """Median seconds per micro batch (an optimizer step every `accum` micro batches), and peak GiB."""
    model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,
                            fused=True)

    def step(i: int) -> None:
        for j in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batches[(i * accum + j) % len(batches)]).loss
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    seconds = statistics.median(s.elapsed_time(e) / 1e3 for s, e in times) / accum
    return seconds, torch.cuda.max_memory_allocated() / 2**30


def run(configs: dict[str, tuple[Callable[[], torch.nn.Module], str]], mix: LengthMix, batch: int,
        n_batches: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    data = [make_batch(mix, batch, vocab=30522, seed=i) for i in range(n_batches)]
    peak = peak_flops()
    rows = []
    for name, (build, layout) in configs.items():
        model = build()
        n_params = sum(p.numel() for p in model.parameters())
        batches = [to_device(d[layout], torch.device("cuda")) for d in data]
        tokens = statistics.mean(d["tokens"] for d in data)
        try:
            seconds, mem = time_steps(model, batches, warmup, iters)
        except Exception as err:  # one broken variant must not cost the whole (scarce) GPU run
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            del model, batches
            torch.cuda.empty_cache()
            continue
        tps = tokens / seconds
        rows.append({"config": name, "layout": layout, "params_m": n_params / 1e6, "step_ms": seconds * 1e3,
                     "real_tokens_per_sec": tps, "mfu": 6 * n_params * tps / peak if peak else None,
                     "peak_mem_gib": mem, "real_token_fraction": tokens / (batch * mix.max_len)})
        del model, batches
        torch.cuda.empty_cache()
    return rows


def print_table(title: str, rows: list[dict[str, Any]], baselines: list[str]) -> None:
    print(f"\n{title}")
    head = f"{'config':<34}{'step ms':>9}{'real tok/s':>13}{'MFU':>7}{'mem GiB':>9}" + "".join(
        f"{'x ' + b:>16}" for b in baselines)
    print(head)
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        ratios = "".join(f"{r['real_tokens_per_sec'] / by_name[b]['real_tokens_per_sec']:>16.2f}" if b in by_name
                         else f"{'-':>16}" for b in baselines)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{r['config']:<34}{r['step_ms']:>9.2f}{r['real_tokens_per_sec']:>13,.0f}{mfu:>7}"
              f"{r['peak_mem_gib']:>9.1f}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--out", default="step_benchmark.json")
    parser.add_argument("--quick", action="store_true", help="only the main configuration and the baselines")
    args = parser.parse_args()
    configs = {
        "mosaicbert (fused GLU)": (lambda: mosaic(), "packed"),
        "mosaicbert (GLU two matmuls)": (lambda: mosaic(glu_fused=False), "packed"),
        "mosaicbert (no fused elementwise)": (lambda: mosaic(fused_ops=False), "packed"),
        "mosaicbert (compiled layers)": (lambda: mosaic(compile_model=True), "packed"),
        "hf-bert sdpa": (lambda: hf_bert(False), "padded"),
        "hf-bert sdpa compiled": (lambda: hf_bert(True), "padded"),
    }
    if args.quick:
        configs = {k: v for k, v in configs.items() if k in ("mosaicbert (fused GLU)", "hf-bert sdpa compiled")}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    baselines = [b for b in ("hf-bert sdpa", "hf-bert sdpa compiled") if b in configs]
    results["pretrain"] = run(configs, PRETRAIN, args.batch, 6, args.warmup, args.iters)
    print_table(f"pretraining regime: seq 128, batch {args.batch}, {PRETRAIN}", results["pretrain"], baselines)
    ft_configs = {k: v for k, v in configs.items() if k in ("mosaicbert (fused GLU)", "hf-bert sdpa compiled")}
    results["finetune"] = run(ft_configs, FINETUNE, args.batch, 6, args.warmup, args.iters)
    print_table(f"finetuning regime: max 256, mean ~64 real tokens, batch {args.batch}", results["finetune"],
                [b for b in baselines if b in ft_configs])
    pre = {r["config"]: r["mfu"] for r in results["pretrain"]}.get("mosaicbert (fused GLU)")
    ft = {r["config"]: r["mfu"] for r in results["finetune"]}.get("mosaicbert (fused GLU)")
    if pre and ft:
        print(f"\nfinetuning-regime MFU / pretraining-regime MFU: {ft / pre:.2f}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
