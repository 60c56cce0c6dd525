"""The unigram baseline of a converted dataset: what an MLM scores without using any context."""

from __future__ import annotations

import json
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


def unigram_loss(path: str | Path, train_split: str = "train", eval_split: str = "val") -> float:
    """Cross-entropy (nats per token) on the held-out split of the best model that ignores context:
    token frequencies counted on the training split (add-one smoothed). [CLS] and [SEP], never
    masked, are left out. An MLM eval loss below it means the model uses the context."""
    import numpy as np

    def counts(split: str) -> Any:
        samples = read_samples(path, split)
        ids = np.concatenate([s[1:-1] for s in samples]).astype(np.int64)
        return np.bincount(ids)

    train, held = counts(train_split), counts(eval_split)
    size = max(len(train), len(held))
    train = np.pad(train, (0, size - len(train))) + 1.0
    held = np.pad(held, (0, size - len(held)))
    logp = np.log(train / train.sum())
    return float(-(held * logp).sum() / held.sum())
