"""Throughput of the real trainer (DeepSpeed engine, `train_step`) on one GPU, and the Figure-4 ablations.

    python -m benchmarks.throughput --out throughput.json              # models x micro batches
    python -m benchmarks.throughput --ablations --out ablations.json  # BERT-Base -> MosaicBERT
    python -m benchmarks.throughput --sweep --out sweep.json          # micro 16..256, eager vs fast path
    python -m benchmarks.throughput --finetune --out finetune.json    # GLUE step: eager, graphs, HF BERT

Each configuration gets a fresh engine (bf16, ZeRO-1, fused AdamW: what `pretrain` runs) and is fed
synthetic batches with the C4-like length mix (benchmarks.synthetic) through the trainer's own
`train_step`. After warm-up (Triton autotuning, allocator), N optimizer steps are timed between two
device synchronisations. Real tokens/s counts non-pad tokens; MFU is the paper's Appendix H
formula, `mfu_exact` uses the exact matmul count (attention and the masked-only head included).
The bare-step row times the same model without DeepSpeed (autocast, fused AdamW; benchmarks.step)
on the same batches, for the trainer-overhead ratio. `--finetune` times the GLUE finetuning step
instead (benchmarks.glue_step; it also runs on a CPU with `--preset tiny --device cpu`).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Iterator
from itertools import cycle
from typing import Any

import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.flops import mfu, paper_flops_per_token, peak_flops
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.engine import build_engine
from mosaicbert_ds.train.graphed_engine_step import GraphedEngineStep
from mosaicbert_ds.train.step import Window, train_step

from .provenance import write_result
from .step import time_steps
from .synthetic import PRETRAIN, make_batch, to_device

# Figure 4 of the paper: each row adds one MosaicBERT change to the rows above it, from BERT-Base.
_ABLATION_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("BERT-Base", {}),
    ("+ attention dropout 0", dict(attention_probs_dropout_prob=0.0)),
    ("+ GLU", dict(mlp_type="glu")),
    ("+ low-precision LayerNorm", dict(low_precision_layernorm=True)),
    ("+ unpadding", dict(unpad=True)),
    ("+ ALiBi / flash", dict(position_embedding_type="alibi")),
    ("MosaicBERT-Base (+ vocab 30528)", dict(pad_vocab_size_multiple=64)),
]
ABLATIONS: list[tuple[str, dict[str, Any]]] = [
    (name, {k: v for _, change in _ABLATION_STEPS[: i + 1] for k, v in change.items()})
    for i, (name, _) in enumerate(_ABLATION_STEPS)
]
"""(row name, the overrides of the bert-base preset that give it)."""


# Trainer variants compared by --overhead: (ds_config additions, build_engine's batched_optimizer,
# cuda_graphs). With CUDA graphs the trainer uses the batched optimizer step, as `pretrain` does.
DS_VARIANTS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "trainer (as pretrain runs it)": ({}, False, False),
    "trainer, CUDA graphs": ({}, True, True),
    "trainer, batched BF16_Optimizer loops": ({}, True, False),
    "trainer, immediate_grad_update": ({"bf16": {"enabled": True, "immediate_grad_update": True}}, False, False),
}


def trainer_setup(
    config: MosaicBertConfig,
    micro: int,
    accum: int,
    ds_overrides: dict[str, Any] | None = None,
    batched_optimizer: bool = False,
    n_batches: int = 6,
) -> tuple[Any, Iterator[dict[str, Any]], int]:
    """A one-GPU DeepSpeed engine as `pretrain` builds it, an endless cycle of pinned synthetic
    batches, and the parameter count."""
    ds_config = build_ds_config(global_batch=micro * accum, micro_batch=micro, world_size=1, lr=5e-4)
    ds_config.update(ds_overrides or {})
    engine, n_params = build_engine(
        config,
        ds_config,
        total_steps=10**6,
        warmup_fraction=0.06,
        final_lr_ratio=0.02,
        batched_optimizer=batched_optimizer,
    )
    layout = "packed"  # unpad=False models pad the packed batch themselves, once, like a padded batch
    data = [make_batch(PRETRAIN, micro, vocab=30522, seed=i)[layout] for i in range(n_batches)]
    batches = cycle([{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in data])
    return engine, batches, n_params


def measure(
    name: str,
    config: MosaicBertConfig,
    micro: int,
    warmup: int,
    steps: int,
    accum: int = 1,
    baseline: str | None = None,
    ds_overrides: dict[str, Any] | None = None,
    batched_optimizer: bool = False,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Optimizer steps through the DeepSpeed trainer on one GPU; returns one result row."""
    engine, batches, n_params = trainer_setup(config, micro, accum, ds_overrides, batched_optimizer)
    graphed = GraphedEngineStep(engine) if cuda_graphs else None
    window = Window(engine.device)
    for _ in range(warmup):
        train_step(engine, batches, accum, 1, window, config, graphed)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    window.reset()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, batches, accum, 1, window, config, graphed)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_flops()
    row = {
        "name": name,
        "micro_batch": micro,
        "accumulation": accum,
        "world_size": 1,
        "params": n_params,
        "real_tokens_per_sec": window.tokens / seconds,
        "samples_per_sec": window.samples / seconds,
        "step_time_sec": seconds / steps,
        "mfu": mfu(paper_flops_per_token(n_params) * window.tokens / seconds, 1, peak),
        "mfu_exact": mfu(window.flops / seconds, 1, peak),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "baseline": baseline,
    }
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def bare_step(
    config: MosaicBertConfig, micro: int, warmup: int, steps: int, accum: int = 1, graphs: bool = False
) -> dict[str, Any]:
    """The same model and batches without DeepSpeed: autocast bf16 + torch fused AdamW; with `graphs`,
    bf16 weights with fp32 master weights (the trainer's precision) and CUDA-graph replays."""
    name = f"bare step (no DeepSpeed) @{micro}"
    timing = dict(master_weights=graphs, graphs=graphs)
    return _timed_row(name, MosaicBertForMaskedLM(config), "packed", micro, warmup, steps, accum, **timing)


def hf_bert_step(micro: int, warmup: int, steps: int) -> dict[str, Any]:
    """Compiled transformers BertForMaskedLM (SDPA, autocast, fused AdamW) on the padded form of the
    same batches: the baseline at this micro batch."""
    from .step import hf_bert

    return _timed_row(f"compiled HF BERT @{micro}", hf_bert(True), "padded", micro, warmup, steps)


def _timed_row(
    name: str, model: torch.nn.Module, layout: str, micro: int, warmup: int, steps: int, accum: int = 1, **timing: bool
) -> dict[str, Any]:
    """One row of the table: `model` timed by benchmarks.step.time_steps on six synthetic batches in
    `layout` ("packed" or "padded"), an optimizer step every `accum` of them. Pass the only
    reference to the model: it is freed before the row is returned."""
    data = [make_batch(PRETRAIN, micro, vocab=30522, seed=i) for i in range(6)]
    batches = [to_device(d[layout], torch.device("cuda")) for d in data]
    seconds, mem = time_steps(model, batches, warmup, steps, accum, **timing)
    seconds *= accum  # per optimizer step
    tokens = accum * sum(d["tokens"] for d in data) / len(data)  # per optimizer step
    n_params = sum(p.numel() for p in model.parameters())
    del model, batches
    torch.cuda.empty_cache()
    return {
        "name": name,
        "micro_batch": micro,
        "accumulation": accum,
        "params": n_params,
        "real_tokens_per_sec": tokens / seconds,
        "step_time_sec": seconds,
        "peak_mem_gib": mem,
        "mfu": mfu(paper_flops_per_token(n_params) * tokens / seconds, 1, peak_flops()),
    }


def sweep(micros: list[int], per_gpu_batch: int, warmup: int, steps: int, hf: bool) -> list[dict[str, Any]]:
    """The real trainer at each micro batch (accumulation = per_gpu_batch / micro), eager and with the
    fast path (CUDA graphs, as `pretrain` runs by default), against the best bare step at micro 256
    measured in the same process, and compiled transformers BERT at the same micro batch."""
    config = MosaicBertConfig.from_name("base")
    rows = []
    for graphs in (True, False):
        bare = attempt(bare_step, config, 256, warmup, steps, per_gpu_batch // 256, graphs=graphs)
        if bare:
            bare.update(name=f"bare step @256{', CUDA graphs' if graphs else ''}", baseline=None)
            rows.append(bare)
    best = max((r for r in rows), key=lambda r: r["real_tokens_per_sec"], default=None)
    for micro in micros:
        accum = max(1, per_gpu_batch // micro)
        for graphs in (True, False):
            row = attempt(
                measure,
                f"trainer @{micro}{', CUDA graphs' if graphs else ', eager'}",
                config,
                micro,
                warmup,
                steps,
                accum,
                baseline=best["name"] if best else None,
                batched_optimizer=graphs,
                cuda_graphs=graphs,
            )
            if row:
                if graphs:  # the fast path is what pretrain runs: the scaling model's per-GPU curve
                    row["model"] = "base"
                rows.append(row)
                print_rows("so far", rows[-1:])
        if hf:
            row = attempt(hf_bert_step, micro, warmup * accum, steps * accum)
            if row:
                row["baseline"] = best["name"] if best else None
                rows.append(row)
    return rows


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(
        f"{'configuration':<36}{'micro':>6}{'real tok/s':>13}{'samples/s':>11}{'step ms':>9}{'MFU':>7}"
        f"{'MFU exact':>10}{'mem GiB':>9}{'vs base':>9}"
    )
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        base = by_name.get(r.get("baseline") or "")
        ratio = f"{r['real_tokens_per_sec'] / base['real_tokens_per_sec']:.2f}x" if base else "-"
        exact = f"{r['mfu_exact']:.1%}" if r.get("mfu_exact") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"  # none without a GPU
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(
            f"{r['name']:<36}{r['micro_batch']:>6}{r['real_tokens_per_sec']:>13,.0f}"
            f"{r.get('samples_per_sec', 0):>11,.0f}{r['step_time_sec'] * 1e3:>9.1f}{mfu:>7}{exact:>10}"
            f"{mem:>9}{ratio:>9}"
        )


def attempt(fn, *args, **kwargs) -> dict[str, Any] | None:
    """Run one measurement; a failing configuration is reported and skipped, not fatal."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        print(f"FAILED {args[0] if args else ''}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        gc.collect()
        torch.cuda.empty_cache()
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", action="store_true", help="the Figure-4 ablation table instead")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="MosaicBERT-Base: bare step vs the trainer with each DeepSpeed variant, interleaved",
    )
    parser.add_argument("--sweep", action="store_true", help="MosaicBERT-Base micro 16..256, eager vs CUDA graphs")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="the GLUE finetuning step at --batch sizes: eager, CUDA graphs, compiled HF BertForSequenceClassification",
    )
    parser.add_argument(
        "--batch", type=int, nargs="*", default=None, help="--finetune: batch sizes (default: 16 32 48)"
    )
    parser.add_argument("--preset", default="base", help="--finetune: model size (base; tiny for a CPU smoke run)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="--finetune: where to run (default: auto)"
    )
    parser.add_argument("--hf", action="store_true", help="--sweep: compiled transformers BERT at each micro batch")
    parser.add_argument("--per-gpu-batch", type=int, default=512, help="--sweep: sequences per GPU per step")
    parser.add_argument("--rounds", type=int, default=2, help="--overhead: rounds of interleaved measurements")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro", type=int, nargs="*", default=None, help="micro batch sizes (default per model)")
    parser.add_argument(
        "--accum",
        type=int,
        default=4,
        help="micro batches per optimizer step (4: the per-GPU work of the 8-GPU recipe)",
    )
    parser.add_argument("--out", default="throughput.json")
    args = parser.parse_args()
    if args.finetune:
        finetune(args)
        return
    from mosaicbert_ds.train.distributed import init_distributed

    init_distributed()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    rows = result["rows"]
    if args.sweep:
        micros = args.micro or [16, 32, 64, 128, 256]
        rows.extend(sweep(micros, args.per_gpu_batch, args.warmup, args.steps, args.hf))
        print_rows(
            f"MosaicBERT-Base, {args.per_gpu_batch} sequences per GPU per step (C4-like lengths at 128); "
            "'vs base': against the best bare step at micro 256",
            rows,
        )
    elif args.overhead:
        micro = args.micro[0] if args.micro else 256
        config = MosaicBertConfig.from_name("base")
        for rnd in range(args.rounds):  # interleaved rounds: process-to-process drift shows as their spread
            for graphs in (False, True):
                bare = attempt(bare_step, config, micro, args.warmup, args.steps, args.accum, graphs=graphs)
                if bare:
                    bare.update(name=f"bare step{', CUDA graphs' if graphs else ''}, round {rnd + 1}", baseline=None)
                    rows.append(bare)
            for variant, (overrides, batched, graphs) in DS_VARIANTS.items():
                row = attempt(
                    measure,
                    f"{variant}, round {rnd + 1}",
                    config,
                    micro,
                    args.warmup,
                    args.steps,
                    args.accum,
                    baseline=f"bare step{', CUDA graphs' if graphs else ''}, round {rnd + 1}",
                    ds_overrides=overrides,
                    batched_optimizer=batched,
                    cuda_graphs=graphs,
                )
                if row:
                    rows.append(row)
        print_rows(
            f"DeepSpeed overhead, MosaicBERT-Base micro {micro} x {args.accum} (C4-like lengths at 128); "
            "each trainer row against the bare step of its round and kind",
            rows,
        )
        by_name = {r["name"]: r["real_tokens_per_sec"] for r in rows}
        for rnd in range(1, args.rounds + 1):
            eager = by_name.get(f"bare step, round {rnd}")
            trainer = by_name.get(f"trainer, CUDA graphs, round {rnd}")
            if eager and trainer:
                print(f"round {rnd}: trainer with CUDA graphs / eager bare step = {trainer / eager:.3f}")
    elif args.ablations:
        micro = args.micro[0] if args.micro else 256
        for name, overrides in ABLATIONS:
            config = MosaicBertConfig.from_name("bert-base", **overrides)
            row = attempt(measure, name, config, micro, args.warmup, args.steps, args.accum, baseline="BERT-Base")
            if row:
                row["model"] = "ablation"
                rows.append(row)
                print_rows("ablations so far", rows[-1:])
        print_rows(
            f"Figure 4 ablations (bf16, DeepSpeed ZeRO-1, micro {micro} x {args.accum}, C4-like lengths at 128)", rows
        )
    else:
        plan = [
            ("base", "mosaicbert-base", [128, 256]),
            ("bert-base", "bert-base", [128, 256]),
            ("large", "mosaicbert-large", [64, 128]),
            ("bert-large", "bert-large", [64]),
        ]
        for preset, label, micros in plan:
            for micro in args.micro or micros:
                baseline = None if preset.startswith("bert") else f"{label.replace('mosaicbert', 'bert')} @{micro}"
                row = attempt(
                    measure,
                    f"{label} @{micro}",
                    MosaicBertConfig.from_name(preset),
                    micro,
                    args.warmup,
                    args.steps,
                    args.accum,
                    baseline=baseline,
                )
                if row:
                    row["model"] = preset
                    rows.append(row)
                    print_rows("so far", rows[-1:])
        ratios = {}
        for micro in (128, 256):
            bare = attempt(bare_step, MosaicBertConfig.from_name("base"), micro, args.warmup, args.steps, args.accum)
            trainer = next((r for r in rows if r["name"] == f"mosaicbert-base @{micro}"), None)
            if bare:
                bare["baseline"] = None
                rows.append(bare)
                if trainer:
                    ratios[micro] = trainer["real_tokens_per_sec"] / bare["real_tokens_per_sec"]
        result["trainer_vs_bare_step"] = ratios
        print_rows(
            f"trainer throughput (bf16, DeepSpeed ZeRO-1 BF16_Optimizer, fused AdamW, accumulation "
            f"{args.accum}, C4-like lengths at 128)",
            rows,
        )
        for micro, ratio in ratios.items():
            print(f"DeepSpeed trainer / bare step, MosaicBERT-Base micro {micro} x {args.accum}: {ratio:.3f}")
    write_result(args.out, result)


def finetune(args: argparse.Namespace) -> None:
    """--finetune: the GLUE step table (benchmarks.glue_step), written to --out."""
    from .glue_step import BATCH_SIZES, bench_device, finetune_rows

    device = bench_device(args.device)
    rows = finetune_rows(args.batch or BATCH_SIZES, args.warmup, args.steps, args.preset, args.device)
    print_rows(
        f"GLUE finetuning step ({args.preset}, 3 classes, sentence pairs of 8-120 tokens, mean 64; "
        "'vs base': against the eager row of the same batch size)",
        rows,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_result(args.out, {"kind": "finetune", "device": name, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
