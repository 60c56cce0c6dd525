"""`mosaicbert-ds eval-mlm MODEL --data PATH`: held-out MLM loss of a model, by position bucket.

    mosaicbert-ds convert val/*.jsonl --max-seq-len 1024 --split-long --tokenizer runs/base/hf --out /data/val-1024
    mosaicbert-ds eval-mlm runs/base/hf --data /data/val-1024 --out runs/base/eval-1024.json

MODEL is an export or import (any layout `import` reads) or a training checkpoint folder; the
dataset is one written by `convert` with the model's tokenizer. Every sequence of the split is
masked as the trainer's evaluation masks it (15% by default, the same tokens on every run) and the
loss is reported overall and per position bucket (0-127, 128-511, 512-1023, 1024-2047, ...;
train.position_loss): a model pretrained at 128 tokens shows here how it does at 512 and 1024.
Batches hold whole sequences up to --micro-tokens tokens; bf16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .position_loss import PositionLoss

KIND = "mosaicbert_ds.eval_mlm/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1].split("\n\n", 1)[0]
    parser.add_argument("model", help="an export or import folder, or a training checkpoint folder")
    parser.add_argument("--data", required=True, help="a dataset written by `mosaicbert-ds convert`")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="masking rate (default: 0.15)")
    parser.add_argument("--micro-tokens", type=int, default=16384, help="tokens per batch (default: 16384)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches (default 0: the whole split)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the masks (default: 17, the trainer's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")


def evaluate_by_position(
    model_path: str,
    data: str,
    split: str = "val",
    mlm_probability: float = 0.15,
    micro_tokens: int = 16384,
    max_batches: int = 0,
    seed: int = 17,
    device: str = "auto",
) -> dict[str, Any]:
    """The loss, accuracy and masked-token count overall and per position bucket."""
    from ..data import build_mlm_dataloader, read_dataset_info
    from .evaluator import micro_batches
    from .export import load_source
    from .step import to_device

    if micro_tokens < 1 or max_batches < 0:
        raise UserError("--micro-tokens must be positive and --max-batches 0 or more")
    info = read_dataset_info(data)
    if split not in info["splits"]:
        raise UserError(f"{data} has no {split!r} split (it has: {', '.join(info['splits'])})")
    source, _ = load_source(model_path)
    config = source.config
    if config.vocab_size < info["vocab_size"]:
        raise UserError(
            f"the model in {model_path} has {config.vocab_size} token embeddings, fewer than the tokenizer of "
            f"{data} ({info['vocab_size']}): the dataset was converted with another tokenizer"
        )
    longest = int(info["max_seq_len"])
    if config.position_embedding_type == "learned" and longest > config.max_position_embeddings:
        raise UserError(
            f"{data} holds sequences of up to {longest} tokens, but the model's learned position embeddings "
            f"stop at {config.max_position_embeddings}"
        )
    micro_tokens = max(micro_tokens, longest)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model = source.model().to(dev).eval()
    loader = build_mlm_dataloader(
        data,
        split=split,
        batch_size=max(1, micro_tokens // longest),
        mlm_probability=mlm_probability,
        seed=seed,
        shuffle=False,
        drop_last=False,
        micro_tokens=micro_tokens,
    )
    by_position = PositionLoss(dev)
    batches = 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for batch in micro_batches(loader):
            if max_batches and batches >= max_batches:
                break
            batch = to_device(batch, dev)
            by_position.add(model(**batch), batch)
            batches += 1
    sums = {k: float(v) for k, v in by_position.scalars().items()}
    metrics, counts = by_position.metrics(sums), by_position.counts(sums)
    masked = sum(counts.values())
    if not masked:
        raise UserError(f"split {split!r} of {data} gave no masked token")
    total_loss = sum(sums[f"pos_loss:{n}"] for n in counts)
    total_correct = sum(sums[f"pos_correct:{n}"] for n in counts)
    return {
        "kind": KIND,
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "mlm_probability": mlm_probability,
        "max_seq_len": longest,
        "batches": batches,
        "masked_tokens": masked,
        "loss": total_loss / masked,
        "accuracy": total_correct / masked,
        "by_position": {
            name: {
                "masked_tokens": counts[name],
                "loss": metrics[f"loss_by_position/{name}"],
                "accuracy": metrics[f"accuracy_by_position/{name}"],
            }
            for name in counts
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"MLM loss by position: {result['model']} on {result['data']} (split {result['split']}, "
        f"{100 * result['mlm_probability']:.0f}% masking, sequences up to {result['max_seq_len']} tokens)",
        f"{'positions':>12} {'masked':>10} {'loss':>8} {'accuracy':>9}",
    ]
    for name, row in result["by_position"].items():
        lines.append(f"{name:>12} {row['masked_tokens']:>10,} {row['loss']:>8.4f} {row['accuracy']:>9.4f}")
    lines.append(f"{'all':>12} {result['masked_tokens']:>10,} {result['loss']:>8.4f} {result['accuracy']:>9.4f}")
    return "\n".join(lines)


def _check_out(path: Path) -> None:
    """--out may be a new file or an earlier eval-mlm result, nothing else."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; name a JSON file")
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("kind") == KIND
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"--out {path} exists and is not an eval-mlm result; choose another file")


def main(args: argparse.Namespace) -> int:
    if args.out is not None:
        _check_out(args.out)
    result = evaluate_by_position(
        args.model,
        args.data,
        args.split,
        args.mlm_probability,
        args.micro_tokens,
        args.max_batches,
        args.seed,
        args.device,
    )
    print(table(result))
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
