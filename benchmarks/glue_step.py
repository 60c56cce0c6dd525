"""The GLUE finetuning step, eager against CUDA graphs against compiled transformers BERT.

    python -m benchmarks.throughput --finetune --out finetune.json                # GPU: batch 16, 32, 48
    python -m benchmarks.throughput --finetune --preset tiny --device cpu --batch 4 --warmup 1 --steps 2

Each row times the finetuning trainer's own step (mosaicbert_ds.glue.trainer.train_step: forward
+ backward under bf16 autocast, clipping at 1.0, torch AdamW, the schedule) on synthetic sentence
pairs at GLUE lengths (benchmarks.synthetic.FINETUNE: 8-120 tokens, mean 64, under GLUE's max
length of 256; the second half of each pair has token type 1; 3 classes), cycling through
N_BATCHES batches per batch size:
  - MosaicBERT (sequence classification), eager, on the packed batch;
  - the same as CUDA-graph replays (glue.graphed_step.GraphedGlueStep, bucket padding included in
    the timed step);
  - transformers BertForSequenceClassification (SDPA, torch.compile) on the padded batch.
Warm-up runs at least one step per batch, so every graph is captured and every shape compiled
before the timed steps; the timed steps run between two device synchronisations. Real tokens/s
counts non-pad tokens; MFU is the paper's 6 x parameters x real tokens/s over the GPU's peak (none
on a CPU). The graphed and compiled rows need CUDA; on a CPU they are reported as skipped.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForSequenceClassification
from mosaicbert_ds.flops import mfu, paper_flops_per_token, peak_flops
from mosaicbert_ds.glue.data import Tokenized
from mosaicbert_ds.glue.graphed_step import GraphedGlueStep
from mosaicbert_ds.glue.runtime import Runtime
from mosaicbert_ds.glue.trainer import train_step

from .synthetic import FINETUNE, LengthMix

N_BATCHES = 6
NUM_LABELS = 3
VOCAB = 30522  # BERT's; MosaicBERT's 30528 rows hold it
BATCH_SIZES = [16, 32, 48]  # the GLUE recipe's (glue.tasks)


def pair_batches(
    mix: LengthMix, batch: int, n_batches: int = N_BATCHES, seed: int = 0, vocab: int = VOCAB
) -> list[dict[str, Any]]:
    """n_batches batches of `batch` synthetic sentence pairs (token ids below `vocab`), each
    {"packed", "padded", "tokens"} on the CPU, built by the finetuning data path
    (glue.data.Tokenized.batch)."""
    out = []
    for i in range(n_batches):
        g = torch.Generator().manual_seed(seed + i)
        lengths = mix.sample(batch, g).numpy()
        offsets = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rng = np.random.default_rng(seed + i)
        ids = rng.integers(5, vocab, offsets[-1]).astype(np.int32)
        types = np.concatenate([(np.arange(n) >= n // 2).astype(np.int8) for n in lengths])
        data = Tokenized(ids, types, offsets, rng.integers(0, NUM_LABELS, batch))
        index = np.arange(batch)
        out.append(
            {"packed": data.batch(index, True), "padded": data.batch(index, False), "tokens": int(lengths.sum())}
        )
    return out


def mosaic_classifier(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MosaicBertConfig.from_name(preset, num_labels=NUM_LABELS)
    config.problem_type = "single_label_classification"
    return MosaicBertForSequenceClassification(config)


def hf_classifier(preset: str) -> torch.nn.Module:
    """transformers' BERT of the preset's size (BERT-Base for base), SDPA attention."""
    from transformers import BertConfig, BertForSequenceClassification

    size = MosaicBertConfig.from_name(preset)
    config = BertConfig(
        vocab_size=min(VOCAB, size.vocab_size),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        num_labels=NUM_LABELS,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def time_steps(
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    rt: Runtime,
    warmup: int,
    steps: int,
    graphs: bool = False,
    compile_model: bool = False,
) -> tuple[float, float | None]:
    """Seconds per train_step (mean over `steps`, after max(warmup, len(batches)) warm-up steps) and
    peak GiB (CUDA), cycling through `batches` (CPU tensors, as the trainer hands them over)."""
    model.to(rt.device).train()
    net = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    graphed = GraphedGlueStep(model) if graphs else None
    cuda = rt.device.type == "cuda"

    def run(i: int) -> None:
        train_step(net, batches[i % len(batches)], optimizer, scheduler, 1.0, rt, graphed)

    for i in range(max(warmup, len(batches))):
        run(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        run(i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


VARIANTS: dict[str, tuple[str, str, dict[str, bool]]] = {
    "eager": ("mosaic", "packed", {}),
    "CUDA graphs": ("mosaic", "packed", {"graphs": True}),
    "compiled": ("hf", "padded", {"compile_model": True}),
}
"""Row label -> (model, batch layout, time_steps options)."""


def bench_device(device: str = "auto") -> torch.device:
    """auto: CUDA when there is a GPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return torch.device("cuda" if use_cuda else "cpu")


def finetune_rows(
    batch_sizes: list[int], warmup: int, steps: int, preset: str = "base", device: str = "auto"
) -> list[dict[str, Any]]:
    """One row per batch size and variant (in print_rows' format); a variant that needs CUDA on a
    CPU, or that fails, is printed as skipped and left out."""
    rt = Runtime(bench_device(device))
    use_cuda = rt.device.type == "cuda"
    peak = peak_flops(rt.device) if use_cuda else None
    label = {"base": "MosaicBERT-Base", "tiny": "MosaicBERT-tiny"}.get(preset, preset)
    rows = []
    for batch in batch_sizes:
        data = pair_batches(FINETUNE, batch, vocab=min(VOCAB, MosaicBertConfig.from_name(preset).vocab_size))
        tokens = sum(d["tokens"] for d in data) / len(data)
        for variant, (kind, layout, options) in VARIANTS.items():
            name = f"{label if kind == 'mosaic' else 'HF BERT'} cls @{batch}, {variant}"
            if not use_cuda and (options.get("graphs") or options.get("compile_model")):
                print(f"{name}: skipped (needs CUDA)")
                continue
            model = mosaic_classifier(preset) if kind == "mosaic" else hf_classifier(preset)
            n_params = sum(p.numel() for p in model.parameters())
            try:
                seconds, mem = time_steps(model, [d[layout] for d in data], rt, warmup, steps, **options)
            except Exception as err:  # one broken variant must not cost the whole (scarce) GPU run
                print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                seconds = None
            del model
            gc.collect()
            if use_cuda:
                torch.cuda.empty_cache()
            if seconds is None:
                continue
            tps = tokens / seconds
            rows.append(
                {
                    "name": name,
                    "regime": "finetune",
                    "micro_batch": batch,
                    "accumulation": 1,
                    "params": n_params,
                    "real_tokens_per_sec": tps,
                    "samples_per_sec": batch / seconds,
                    "step_time_sec": seconds,
                    "mfu": mfu(paper_flops_per_token(n_params) * tps, 1, peak),
                    "peak_mem_gib": mem,
                    "baseline": None if variant == "eager" else f"{label} cls @{batch}, eager",
                }
            )
    return rows
