"""A bare MosaicBERT training step on one GPU against transformers' BERT, in one run.

    python -m benchmarks.step --out step.json
    python -m benchmarks.step --lengths 128,512,1024,2048,4096,8192 --micro-tokens 32768 --out step_long.json

Each configuration runs forward, backward and a fused AdamW step under bf16 autocast (or, for the
"bf16 weights" row, on a bf16 model with fp32 master weights, DeepSpeed's arithmetic) on the same
synthetic batches (benchmarks.synthetic: C4-like lengths, 30% masking), with warm-up (compile,
autotune) first and CUDA events around each step; the median step time over rotating batches is
reported. Real tokens/s counts only non-pad tokens; MFU is the paper's 6 * params * tokens/s over
the GPU's peak (mosaicbert_ds.flops). Baselines: BertForMaskedLM with SDPA, eager and compiled,
on the padded form of the same batches.

`--lengths` times MosaicBERT-Base instead at each sequence length with micro batches of
--micro-tokens tokens (full sequences: micro_tokens / length of them, what batch.micro_tokens
gives on packed data), eager and as CUDA-graph replays (from 512 tokens also with the attention
kernel's ALiBi reach, MOSAICBERT_FLASH_ALIBI_REACH=1), with bf16 weights and fp32 master weights
(DeepSpeed's arithmetic). Besides real tokens/s and peak memory it reports the exact-FLOPs MFU
(mosaicbert_ds.flops.training_flops: matmuls, attention over every real pair, the masked-only
head) and the attention's share of those FLOPs, and ends with the long-input target: the
exact-FLOPs MFU at 2048 tokens within LENGTH_MFU_TOLERANCE of its value at 128.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.flops import peak_flops, training_flops
from mosaicbert_ds.graphed_mlm_step import GraphedMLMStep

from .attention import alibi_reach_on
from .provenance import write_result
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


ADAMW = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5, fused=True)


class MasterWeightAdamW:
    """Fused AdamW on fp32 master copies of a bf16 model: the arithmetic of DeepSpeed's
    BF16_Optimizer (bf16 weights and gradients, fp32 gradient sum, fp32 update), without DeepSpeed."""

    def __init__(self, params) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, **ADAMW)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            for p in self.params:
                p.grad = None
        else:
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])


def time_steps(
    model: torch.nn.Module,
    batches: list[dict],
    warmup: int,
    iters: int,
    accum: int = 1,
    master_weights: bool = False,
    graphs: bool = False,
    graph_accumulate: bool = False,
) -> tuple[float, float]:
    """Median seconds per micro batch (an optimizer step every `accum` micro batches), and peak GiB.

    Default: fp32 weights under bf16 autocast. master_weights: bf16 weights, no autocast, fp32
    master weights in the optimizer (MasterWeightAdamW). graphs: forward + backward replayed as
    CUDA graphs (mosaicbert_ds.graphed_mlm_step; bucket padding included in the timed step), the gradients
    handed over as the graphs' outputs, or added in place into fixed .grad buffers with
    graph_accumulate (what accumulating over micro batches needs)."""
    model.cuda().train()
    if master_weights:
        model.bfloat16()
        opt = MasterWeightAdamW(model.parameters())
    else:
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    accumulate = graph_accumulate or accum > 1
    graphed = (
        GraphedMLMStep(model, autocast_dtype=None if master_weights else torch.bfloat16, accumulate=accumulate)
        if graphs
        else None
    )

    def step(i: int) -> None:
        for j in range(accum):
            batch = batches[(i * accum + j) % len(batches)]
            if graphed is not None:
                graphed(batch, grad_scale=1 / accum)
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not master_weights):
                loss = model(**batch).loss
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=graphed is None or not accumulate)

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


def run(
    configs: dict[str, tuple[Callable[[], torch.nn.Module], str]],
    mix: LengthMix,
    batch: int,
    n_batches: int,
    warmup: int,
    iters: int,
) -> list[dict[str, Any]]:
    """Each configuration's step on the same batches. A layout is the batch form ("packed" or
    "padded") with optional flags: "+bf16" for bf16 weights with fp32 master weights, "+graphs"
    for CUDA graphs, "+acc" for graphs adding into fixed .grad buffers (time_steps' master_weights,
    graphs and graph_accumulate)."""
    data = [make_batch(mix, batch, vocab=30522, seed=i) for i in range(n_batches)]
    peak = peak_flops()
    rows = []
    for name, (build, layout) in configs.items():
        model = build()
        n_params = sum(p.numel() for p in model.parameters())
        form, *flags = layout.split("+")
        batches = [to_device(d[form], torch.device("cuda")) for d in data]
        tokens = statistics.mean(d["tokens"] for d in data)
        try:
            seconds, mem = time_steps(
                model,
                batches,
                warmup,
                iters,
                master_weights="bf16" in flags,
                graphs="graphs" in flags,
                graph_accumulate="acc" in flags,
            )
        except Exception as err:  # one broken variant must not cost the whole (scarce) GPU run
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            del model, batches
            torch.cuda.empty_cache()
            continue
        tps = tokens / seconds
        rows.append(
            {
                "config": name,
                "layout": layout,
                "params_m": n_params / 1e6,
                "step_ms": seconds * 1e3,
                "real_tokens_per_sec": tps,
                "mfu": 6 * n_params * tps / peak if peak else None,
                "peak_mem_gib": mem,
                "real_token_fraction": tokens / (batch * mix.max_len),
            }
        )
        del model, batches
        torch.cuda.empty_cache()
    return rows


def print_table(title: str, rows: list[dict[str, Any]], baselines: list[str]) -> None:
    print(f"\n{title}")
    head = f"{'config':<48}{'step ms':>9}{'real tok/s':>13}{'MFU':>7}{'mem GiB':>9}" + "".join(
        f"{'x ' + b:>16}" for b in baselines
    )
    print(head)
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        ratios = "".join(
            f"{r['real_tokens_per_sec'] / by_name[b]['real_tokens_per_sec']:>16.2f}" if b in by_name else f"{'-':>16}"
            for b in baselines
        )
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(
            f"{r['config']:<48}{r['step_ms']:>9.2f}{r['real_tokens_per_sec']:>13,.0f}{mfu:>7}"
            f"{r['peak_mem_gib']:>9.1f}{ratios}"
        )


def glu_sweep(batches: list[int], warmup: int, iters: int, out: str) -> None:
    """Appendix J: the fused (one d -> 2ff matmul + GeGLU kernel) and unfused (two matmuls) GLU
    trade places with the batch size; both at each size, on the same batches."""
    configs = {
        "fused GLU": (lambda: mosaic(), "packed"),
        "GLU two matmuls": (lambda: mosaic(glu_fused=False), "packed"),
    }
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sweep": {}}
    print(f"\n{'batch':>6}{'fused tok/s':>14}{'two matmuls tok/s':>20}{'fused / two':>13}")
    for batch in batches:
        rows = {r["config"]: r for r in run(configs, PRETRAIN, batch, 6, warmup, iters)}
        results["sweep"][batch] = rows
        if len(rows) == 2:
            f, t = rows["fused GLU"]["real_tokens_per_sec"], rows["GLU two matmuls"]["real_tokens_per_sec"]
            print(f"{batch:>6}{f:>14,.0f}{t:>20,.0f}{f / t:>13.2f}")
    write_result(out, results)


LENGTH_MFU_TOLERANCE = 0.10
"""The long-input target: exact-FLOPs MFU at 2048 at least (1 - this) x its value at 128."""


def attention_flops_share(config: MosaicBertConfig, lengths: list[int], n_masked: int) -> float:
    """The attention scores' share of training_flops (the rest: matmuls and the head)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    return 3.0 * layers * sum(4 * n * n * d for n in lengths) / training_flops(config, lengths, n_masked)


def run_lengths(lengths: list[int], micro_tokens: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    """MosaicBERT-Base's step at each length, micro batches of micro_tokens tokens of full sequences."""
    config = MosaicBertConfig.from_name("base")
    peak = peak_flops()
    rows = []
    for length in lengths:
        n_seq = max(1, micro_tokens // length)
        mix = LengthMix(max_len=length, full_fraction=1.0, min_len=length, max_partial=length)
        data = [make_batch(mix, n_seq, vocab=config.vocab_size, seed=i) for i in range(4)]
        batches = [to_device(d["packed"], torch.device("cuda")) for d in data]
        tokens = statistics.mean(d["tokens"] for d in data)
        flops = statistics.mean(training_flops(config, d["lengths"], d["masked"]) for d in data)
        share = attention_flops_share(config, data[0]["lengths"], data[0]["masked"])
        modes = [("eager", False, False), ("graphs", True, False)]
        if length >= 512:
            modes.append(("graphs+reach", True, True))
        for label, graphs, reach in modes:
            torch.manual_seed(0)
            model = MosaicBertForMaskedLM(config)
            n_params = sum(p.numel() for p in model.parameters())
            try:
                with alibi_reach_on() if reach else contextlib.nullcontext():
                    seconds, mem = time_steps(model, batches, warmup, iters, master_weights=True, graphs=graphs)
            except Exception as err:  # e.g. out of memory at one length: the other lengths still count
                print(f"length {length} {label}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                del model
                torch.cuda.empty_cache()
                continue
            rows.append(
                {
                    "length": length,
                    "mode": label,
                    "sequences_per_micro": n_seq,
                    "tokens_per_micro": tokens,
                    "step_ms": seconds * 1e3,
                    "real_tokens_per_sec": tokens / seconds,
                    "mfu": 6 * n_params * tokens / seconds / peak if peak else None,
                    "mfu_exact": flops / seconds / peak if peak else None,
                    "attention_flops_share": share,
                    "peak_mem_gib": mem,
                }
            )
            del model
            torch.cuda.empty_cache()
    return rows


def print_lengths(rows: list[dict[str, Any]], micro_tokens: int) -> None:
    print(f"\nMosaicBERT-Base step by sequence length, micro batches of {micro_tokens} tokens (full sequences)")
    print(
        f"{'length':>7}{'mode':>14}{'seqs':>6}{'step ms':>9}{'real tok/s':>13}{'MFU':>7}{'MFU exact':>10}"
        f"{'attn share':>11}{'mem GiB':>9}"
    )
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        exact = f"{r['mfu_exact']:.1%}" if r["mfu_exact"] else "-"
        print(
            f"{r['length']:>7}{r['mode']:>14}{r['sequences_per_micro']:>6}{r['step_ms']:>9.2f}"
            f"{r['real_tokens_per_sec']:>13,.0f}{mfu:>7}{exact:>10}{r['attention_flops_share']:>11.1%}"
            f"{r['peak_mem_gib']:>9.1f}"
        )
    at_128 = {r["mode"]: r["mfu_exact"] for r in rows if r["length"] == 128 and r["mfu_exact"]}
    for mode in ("eager", "graphs", "graphs+reach"):
        by_length = {r["length"]: r["mfu_exact"] for r in rows if r["mode"] == mode and r["mfu_exact"]}
        by_length.setdefault(128, at_128.get(mode.split("+")[0]))  # the reach starts at 512
        if by_length.get(128) and 2048 in by_length:
            ratio = by_length[2048] / by_length[128]
            verdict = "meets" if ratio >= 1 - LENGTH_MFU_TOLERANCE else "MISSES"
            print(
                f"target ({mode}): exact MFU at 2048 is {ratio:.2f}x its value at 128 ({verdict} the "
                f">= {1 - LENGTH_MFU_TOLERANCE:.2f}x target)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--out", default="step_benchmark.json")
    parser.add_argument("--quick", action="store_true", help="only the main configuration and the baselines")
    parser.add_argument(
        "--lengths", default=None, help="MosaicBERT-Base at these sequence lengths instead, e.g. 128,512,2048"
    )
    parser.add_argument("--micro-tokens", type=int, default=32768, help="tokens per micro batch with --lengths")
    parser.add_argument(
        "--glu-sweep",
        type=int,
        nargs="*",
        metavar="BATCH",
        help="Appendix J instead: fused GLU vs two matmuls at these batch sizes",
    )
    args = parser.parse_args()
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
        rows = run_lengths(lengths, args.micro_tokens, args.warmup, args.iters)
        print_lengths(rows, args.micro_tokens)
        write_result(
            args.out,
            {
                "kind": "step_lengths",
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "micro_tokens": args.micro_tokens,
                "mfu_tolerance": LENGTH_MFU_TOLERANCE,
                "lengths": rows,
            },
        )
        return
    if args.glu_sweep:
        glu_sweep(args.glu_sweep, args.warmup, args.iters, args.out)
        return
    configs = {
        "mosaicbert (fused GLU)": (lambda: mosaic(), "packed"),
        "mosaicbert (bf16 weights, fp32 master)": (lambda: mosaic(), "packed+bf16"),
        "mosaicbert (CUDA graphs)": (lambda: mosaic(), "packed+graphs"),
        "mosaicbert (CUDA graphs, in-place accumulation)": (lambda: mosaic(), "packed+graphs+acc"),
        "mosaicbert (CUDA graphs, bf16 weights)": (lambda: mosaic(), "packed+bf16+graphs"),
        "mosaicbert (GLU two matmuls)": (lambda: mosaic(glu_fused=False), "packed"),
        "mosaicbert (no fused elementwise)": (lambda: mosaic(fused_ops=False), "packed"),
        "mosaicbert (compiled layers)": (lambda: mosaic(compile_model=True), "packed"),
        "hf-bert sdpa": (lambda: hf_bert(False), "padded"),
        "hf-bert sdpa compiled": (lambda: hf_bert(True), "padded"),
    }
    if args.quick:
        configs = {
            k: v
            for k, v in configs.items()
            if k
            in (
                "mosaicbert (fused GLU)",
                "mosaicbert (bf16 weights, fp32 master)",
                "mosaicbert (CUDA graphs)",
                "mosaicbert (CUDA graphs, in-place accumulation)",
                "hf-bert sdpa compiled",
            )
        }
    results = {"kind": "step", "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    baselines = [b for b in ("hf-bert sdpa", "hf-bert sdpa compiled") if b in configs]
    results["pretrain"] = run(configs, PRETRAIN, args.batch, 6, args.warmup, args.iters)
    print_table(f"pretraining regime: seq 128, batch {args.batch}, {PRETRAIN}", results["pretrain"], baselines)
    ft_configs = {
        k: v
        for k, v in configs.items()
        if k in ("mosaicbert (fused GLU)", "mosaicbert (CUDA graphs)", "hf-bert sdpa compiled")
    }
    results["finetune"] = run(ft_configs, FINETUNE, args.batch, 6, args.warmup, args.iters)
    print_table(
        f"finetuning regime: max 256, mean ~64 real tokens, batch {args.batch}",
        results["finetune"],
        [b for b in baselines if b in ft_configs],
    )
    for name in ("mosaicbert (fused GLU)", "mosaicbert (CUDA graphs)"):
        pre = {r["config"]: r["mfu"] for r in results["pretrain"]}.get(name)
        ft = {r["config"]: r["mfu"] for r in results["finetune"]}.get(name)
        if pre and ft:
            print(f"finetuning-regime MFU / pretraining-regime MFU, {name}: {ft / pre:.2f}")
    write_result(args.out, results)


if __name__ == "__main__":
    main()
