"""Checks that run before any GPU time is spent: the data as the loader will read it, the output folder.

`check_run` is called by `pretrain` (and `--dry-run`) once the run config, the model config and the
ds_config are known and before the DeepSpeed engine is built. Every failure is a UserError with one
line. What it checks (docs/preflight.md lists each message):

- every split the run reads (train; the eval split when eval.interval > 0) is in the dataset index
  and has its MDS `index.json`, readable, with a sample count that matches the dataset index;
- for a local dataset, every shard file the loader will open exists with the size its index
  records (the compressed file for compressed shards);
- token ids of a sample of stored sequences (a few shards, up to SAMPLES_PER_SHARD each) are below
  the model's vocabulary, and sequence lengths fit learned position embeddings;
- the train split holds at least one global batch; the eval split at least one sample;
- the dataset's max_seq_len fits learned position embeddings and batch.micro_tokens;
- the output folder is a folder (or can be created) and a file can be written in it, and it is
  not (nor inside) a dataset, an export or other model folder, a checkpoint folder or a tag
  (`folders.check_destination`): a run written there would be swallowed when that is replaced.

Nothing is written except one probe file, removed at once, in the output folder or the nearest
existing folder above it; a missing output folder is not created here.

For a remote dataset (s3://, gs://, ...) only what is cheap is checked (`check_remote_split`):
each split's `index.json` is fetched into the cache and compared with the dataset index. Shard
sizes and token ids are not read: that would download shards before the run starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

SHARDS_TO_SAMPLE = 4
"""Shards whose token ids are read: the first, the last and evenly spaced ones between."""
SAMPLES_PER_SHARD = 256


def check_run(cfg: Any, model_config: Any, ds_config: dict[str, Any], info: dict[str, Any]) -> None:
    """Every check above for a run (`cfg`: RunConfig; `info`: the dataset index from read_dataset_info)."""
    from ..data.info import is_remote

    path = str(cfg.data.path)
    check_lengths(cfg, model_config, info)
    global_batch = int(ds_config["train_batch_size"])
    splits = [(cfg.data.train_split, "data.train_split", global_batch)]
    if cfg.eval.interval:
        splits.append((cfg.data.eval_split, "data.eval_split", 1))
    for split, key, need in splits:
        entry = info.get("splits", {}).get(split)
        if entry is None:
            known = ", ".join(info.get("splits", {})) or "none"
            extra = " (set eval.interval=0 to train without evaluation)" if key == "data.eval_split" else ""
            raise UserError(f"{key}: {path} has no {split!r} split (it has: {known}){extra}")
        samples = int(entry.get("samples", 0))
        if samples < need:
            what = "one global batch" if need > 1 else "one sample"
            raise UserError(
                f"{key}: split {split!r} of {path} has {samples} samples, fewer than {what} "
                f"({need}); lower batch.global_batch (or batch.global_tokens) or convert more text"
            )
        if is_remote(path):
            check_remote_split(path, split, samples, cfg.data.remote_cache)
        else:
            check_local_split(Path(path), split, samples, info, model_config)
    check_output_dir(cfg.output_dir)


def check_lengths(cfg: Any, model_config: Any, info: dict[str, Any]) -> None:
    """The dataset's longest sample (its index's max_seq_len) against learned position embeddings
    and the micro batch's token budget."""
    longest = int(info.get("max_seq_len", 0))
    if getattr(model_config, "position_embedding_type", "alibi") == "learned":
        positions = int(model_config.max_position_embeddings)
        if longest > positions:
            raise UserError(
                f"data.path {cfg.data.path} holds sequences of up to {longest} tokens, but the model's learned "
                f"position embeddings stop at max_position_embeddings={positions}; convert with --max-seq-len "
                f"{positions} (or, for a new model, set model.overrides.max_position_embeddings={longest})"
            )
    budget = cfg.batch.micro_tokens
    if budget and budget < longest:
        raise UserError(
            f"batch.micro_tokens={budget} is below the longest sample of {cfg.data.path} ({longest} tokens): "
            "a micro batch must hold at least one whole sample"
        )


def _read_split_index(index_file: Path, split: str, expected_samples: int) -> list[dict[str, Any]]:
    if not index_file.is_file():
        raise UserError(f"{index_file} is missing: split {split!r} is incomplete; re-run `mosaicbert-ds convert`")
    try:
        shards = json.loads(index_file.read_text())["shards"]
        total = sum(int(s["samples"]) for s in shards)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{index_file} is not a readable MDS index ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if total != expected_samples:
        raise UserError(
            f"{index_file} lists {total} samples but the dataset index says {expected_samples}: "
            "the split does not belong to this dataset; re-run `mosaicbert-ds convert`"
        )
    return shards


def _stored_file(shard: dict[str, Any]) -> dict[str, Any]:
    """The file streaming opens for a shard: the compressed one when the shard is compressed."""
    return shard["zip_data"] if shard.get("compression") else shard["raw_data"]


def check_local_split(root: Path, split: str, expected_samples: int, info: dict[str, Any], model_config: Any) -> None:
    """The split's MDS index, every shard's size, and the token ids of a sample of sequences."""
    folder = root / split
    shards = _read_split_index(folder / "index.json", split, expected_samples)
    for shard in shards:
        stored = _stored_file(shard)
        file = folder / stored["basename"]
        try:
            size = file.stat().st_size
        except OSError:
            raise UserError(
                f"shard {file} is missing (listed in {folder / 'index.json'}); re-run `mosaicbert-ds convert`"
            ) from None
        if size != int(stored["bytes"]):
            raise UserError(
                f"shard {file} has {size} bytes, its index says {stored['bytes']}: "
                "the shard is truncated or was replaced; re-run `mosaicbert-ds convert`"
            )
    picks = sorted(
        {round(i * (len(shards) - 1) / max(SHARDS_TO_SAMPLE - 1, 1)) for i in range(min(SHARDS_TO_SAMPLE, len(shards)))}
    )
    vocab = int(model_config.vocab_size)
    learned = getattr(model_config, "position_embedding_type", "alibi") == "learned"
    max_len = int(getattr(model_config, "max_position_embeddings", 0))
    dtype = np.dtype(info["token_dtype"]).newbyteorder("<")
    for index in picks:
        for ids in _sample_tokens(folder, split, shards[index], dtype):
            if ids.size and int(ids.max()) >= vocab:
                raise UserError(
                    f"split {split!r}, shard {_stored_file(shards[index])['basename']}: token id "
                    f"{int(ids.max())} is not below the model's vocab_size {vocab}; the dataset "
                    "was converted with another tokenizer, or model.overrides.vocab_size is too small"
                )
            if learned and ids.size > max_len:
                raise UserError(
                    f"split {split!r}: a stored sequence has {ids.size} tokens but the model's "
                    f"learned position embeddings stop at max_position_embeddings={max_len}"
                )


def _sample_tokens(folder: Path, split: str, shard: dict[str, Any], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of the first SAMPLES_PER_SHARD samples of a shard, decoded by streaming's own reader."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    stored = _stored_file(shard)
    file = folder / stored["basename"]
    try:
        data = file.read_bytes()
        if shard.get("compression"):
            data = decompress(shard["compression"], data)
        reader = reader_from_json(str(folder.parent), split, shard)
        count = min(int(shard["samples"]), SAMPLES_PER_SHARD)
        offsets = np.frombuffer(data, np.uint32, count=count + 1, offset=4)  # MDS: n, then n+1 offsets
        samples = [reader.decode_sample(data[offsets[i] : offsets[i + 1]]) for i in range(count)]
        return [np.frombuffer(s["input_ids"], dtype=dtype) for s in samples]
    except Exception as err:  # any decoding failure: the shard is damaged
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"shard {file} cannot be read ({message}); re-run `mosaicbert-ds convert`") from None


def check_remote_split(url: str, split: str, expected_samples: int, remote_cache: str | None) -> None:
    """A remote split: its MDS index.json is fetched into the cache and its sample count compared."""
    from ..data.info import _fetch, default_cache_dir, first_line, probe_remote

    cache = Path(remote_cache or default_cache_dir(url)) / split
    cache.mkdir(parents=True, exist_ok=True)
    remote_index = f"{url.rstrip('/')}/{split}/index.json"
    try:
        _fetch(remote_index, str(cache / "index.json"))
    except Exception as err:  # the store refuses (credentials, endpoint, bucket), or the split is missing
        probe_remote(url)
        raise UserError(f"cannot fetch {remote_index} ({first_line(err)})") from None
    _read_split_index(cache / "index.json", split, expected_samples)


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """The output folder is a folder, or can be created, and a file can be written in it; it is
    not a dataset, an export or another model folder, a checkpoint folder or tag, nor inside one
    or inside a run's own entries (mosaicbert_ds.folders)."""
    from ..folders import check_destination, check_location

    check_location(output_dir, "output_dir")
    check_destination(output_dir, "run")
