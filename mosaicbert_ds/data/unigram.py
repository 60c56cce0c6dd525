"""The unigram baseline of a converted dataset: what an MLM scores without using any context.

A model that ignores its input predicts the token frequencies of the training data at every
masked position; its loss is the unigram level, the *plateau* a stuck pretraining run sits on
(docs/convergence.md). `convert` counts the tokens of every split as it writes them and stores in
the dataset index (computed once there):

- `unigram_entropy`: the entropy of the training split's token frequencies (nats per token),
  the level of the training loss on the plateau;
- `unigram_val_loss`: the cross-entropy on val/ of those frequencies (add-one smoothed over the
  vocabulary), the level of the held-out loss on the plateau.

[CLS] and [SEP], never masked, are left out of both. Datasets converted before these fields
existed get the same numbers from their shards (`unigram_loss`, `unigram_levels`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_samples(path: str | Path, split: str) -> list[Any]:
    """Every stored sample of a split of a `convert` dataset, as token-id arrays."""
    import numpy as np
    from streaming.base.format import reader_from_json

    root = Path(path)
    dtype = np.dtype(json.loads((root / "mosaicbert_index.json").read_text())["token_dtype"]).newbyteorder("<")
    index = json.loads((root / split / "index.json").read_text())
    samples = []
    for info in index["shards"]:
        shard = reader_from_json(str(root), split, info)
        raw = root / split / info["raw_data"]["basename"]
        if not raw.exists() and info.get("zip_data"):  # decompress as streaming's own reader does
            from streaming.base.compression import decompress

            packed = (root / split / info["zip_data"]["basename"]).read_bytes()
            tmp = raw.with_name(raw.name + ".partial")
            tmp.write_bytes(decompress(info["compression"], packed))
            tmp.replace(raw)
        for i in range(shard.samples):
            samples.append(np.frombuffer(shard.get_item(i)["input_ids"], dtype=dtype))
    return samples


def unigram_stats(train_counts: Any, held_counts: Any | None, vocab_size: int) -> dict[str, float | None]:
    """`unigram_entropy` of the training counts and `unigram_val_loss` of the held-out counts
    (None without held-out tokens), from token-id count arrays."""
    import numpy as np

    size = max(vocab_size, len(train_counts), 0 if held_counts is None else len(held_counts))
    train = np.pad(np.asarray(train_counts, dtype=np.float64), (0, size - len(train_counts)))
    p = train[train > 0] / max(train.sum(), 1.0)
    stats: dict[str, float | None] = {"unigram_entropy": float(-(p * np.log(p)).sum()), "unigram_val_loss": None}
    if held_counts is not None and np.sum(held_counts) > 0:
        held = np.pad(np.asarray(held_counts, dtype=np.float64), (0, size - len(held_counts)))
        logp = np.log((train + 1.0) / (train.sum() + size))
        stats["unigram_val_loss"] = float(-(held * logp).sum() / held.sum())
    return stats


def split_counts(path: str | Path, split: str) -> Any:
    """Token-id counts of a split, read from its shards ([CLS] and [SEP] left out)."""
    import numpy as np

    samples = read_samples(path, split)
    ids = np.concatenate([s[1:-1] for s in samples]) if samples else np.zeros(0, np.int64)
    return np.bincount(ids.astype(np.int64))


def unigram_levels(path: str | Path, train_split: str = "train", eval_split: str = "val") -> dict[str, float | None]:
    """The dataset's `unigram_entropy` and `unigram_val_loss`: from its index where `convert`
    stored them (the default splits), else counted from the shards."""
    root = Path(path)
    index = json.loads((root / "mosaicbert_index.json").read_text())
    if (train_split, eval_split) == ("train", "val") and index.get("unigram_entropy") is not None:
        return {"unigram_entropy": index["unigram_entropy"], "unigram_val_loss": index.get("unigram_val_loss")}
    held = split_counts(root, eval_split) if (root / eval_split / "index.json").exists() else None
    return unigram_stats(split_counts(root, train_split), held, index["vocab_size"])


def unigram_loss(path: str | Path, train_split: str = "train", eval_split: str = "val") -> float:
    """Cross-entropy (nats per token) on the held-out split of the best model that ignores context:
    token frequencies counted on the training split (add-one smoothed over the vocabulary).
    [CLS] and [SEP], never masked, are left out. An MLM eval loss below it means the model uses
    the context."""
    loss = unigram_levels(path, train_split, eval_split)["unigram_val_loss"]
    if loss is None or not math.isfinite(loss):
        raise ValueError(f"{path} has no held-out tokens in {eval_split}/")
    return loss
