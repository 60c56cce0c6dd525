"""Streaming pretraining data: converted MDS shards -> masked, unpadded MLM batches.

    loader = build_mlm_dataloader("/data/c4-128", split="train", batch_size=128,
                                  mlm_probability=0.30, seed=17, num_canonical_nodes=64,
                                  accumulation_steps=4)
    for epoch in range(...):
        for batch in loader: ...          # each new `for` is the next epoch
    state = loader.state_dict()           # rank 0 saves it with the checkpoint
    loader.load_state_dict(state)         # every rank, on a fresh loader, before iterating

Distribution. streaming.StreamingDataset reads RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE (set here from DeepSpeed's LOCAL_SIZE when missing) and gives each rank its
own part. The order of an epoch depends only on the dataset, the seed, the epoch and
num_canonical_nodes (NCN); it is dealt out to ranks round robin and to each rank's DataLoader
workers batch by batch, so global micro step k (every rank's k-th micro batch of b samples) is
always the block [k*b*W, (k+1)*b*W) of that one order. Hence, for the same seed and NCN, one
optimizer step of G samples is the same set for world size 4 x micro batch b, world size 2 x
b x 2 accumulation micro steps and world size 1 x b x 4 micro steps, on any number of nodes
and workers: it is always the next G samples of the order. Conditions: NCN is a multiple of
the number of nodes (with more nodes than NCN streaming pads the order differently; where
neither divides the other it refuses, and so do we, with a UserError), and the trainer groups
micro batches into steps as the loader delivers them. At the end of an epoch, pass
`accumulation_steps` so the last incomplete step is dropped in every layout; a layout with
more ranks can still take one more step there, because streaming repeats up to W-1 samples so
that every rank gets as many.

The rule for NCN: pass the same value to every run of an experiment (keep it in the run
config) and make it a multiple of every node count you will use (64 covers 1, 2, 4, ..., 64
nodes). Left None, it is derived from the dataset size alone (never from the world), so it is
still the same for every world size; a checkpoint's state_dict carries it, so resumed runs
keep theirs whatever is passed.

Resume. `state_dict()` records (epoch, samples seen by all ranks together, seed, NCN). A new
loader that loads it continues with exactly the samples not yet seen, with the same masks, also
on a different world size, micro batch or worker count, as long as the global batch size is
the same (so the position is on a global-batch boundary). Resumed exactly at the end of an
epoch, the loader goes straight on to the next epoch.

Token budgets. With `micro_tokens` the trainer reads each rank's whole share of an optimizer step
at once (batch_size = global batch / world size, no accumulation groups) and the collator splits
it into micro batches of at most `micro_tokens` tokens (TokenBudgetCollator). The step is still
the next G samples of the order, so everything above holds unchanged; only the number of micro
batches varies, per step and per rank.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState
from torch.utils.data import DataLoader, get_worker_info

from ..batch import IGNORE_INDEX
from ..errors import UserError
from .collator import MLMCollator, TokenBudgetCollator
from .info import default_cache_dir, first_line, is_remote, read_dataset_info
from .packing import decode_lengths
from .shm_registration import one_registration_per_host

MAX_DEFAULT_CANONICAL_NODES = 64
SAMPLES_PER_DEFAULT_CANONICAL_NODE = 4096


STAMP_SUFFIX = ".checked"
"""Beside a decompressed shard `X.mds`: `X.mds.checked`, what the copy and its compressed file were
(inode, size, mtime, ctime) when the copy was made from the hash-checked compressed data."""


class CheckedStream(Stream):
    """A Stream that reads a decompressed shard only if it was made, by this class, from its
    hash-checked compressed file, and neither has changed since.

    Read in place, streaming decompresses each `.mds.zstd` into a `.mds` beside it and keeps it
    for later runs, checking the hash only while decompressing; the loader then reads the `.mds`.
    Here every decompression leaves a stamp (STAMP_SUFFIX) of both files; at set-up a kept copy
    without a stamp that matches both files as they are now (a copy garbled or rewritten at the
    same size, whatever its mtime; a compressed file replaced after the copy was made; a copy of
    another version or tool) is removed, so the shard is decompressed and checked again when it
    is first read. What the loader reads is then always what preflight checked: the compressed
    file. A few `stat` calls and one small read per shard, once per node (streaming's local leader).
    """

    def set_up_local(self, shards: list[Any], cache_usage_per_shard: np.ndarray) -> None:
        for shard in shards:
            if any(not _trusted_raw(self.local, self.split, raw, zip_) for raw, zip_ in shard.file_pairs if zip_):
                shard._evict_raw()
        super().set_up_local(shards, cache_usage_per_shard)

    def _decompress_shard_part(self, zip_info: Any, zip_filename: str, raw_filename: str, compression: Any) -> None:
        super()._decompress_shard_part(zip_info, zip_filename, raw_filename, compression)
        stamp = {"raw": _identity(raw_filename), "zip": _identity(zip_filename)}
        tmp = f"{raw_filename}{STAMP_SUFFIX}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.replace(tmp, raw_filename + STAMP_SUFFIX)


def _identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _trusted_raw(local: str, split: str, raw_info: Any, zip_info: Any) -> bool:
    """Whether a kept decompressed copy may be read: absent (nothing to trust), or stamped as made
    from the compressed file as it is now, and unchanged since, at the index's size."""
    raw = os.path.join(local, split or "", raw_info.basename)
    current = _identity(raw)
    if current is None:
        return True
    try:
        with open(raw + STAMP_SUFFIX, encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    packed = _identity(os.path.join(local, split or "", zip_info.basename))
    return current[1] == raw_info.bytes and stamp == {"raw": current, "zip": packed}


class TokenSampleDataset(StreamingDataset):
    """StreamingDataset of converted samples: {"input_ids": token ids, "index": global sample
    index, "epoch": epoch}; index and epoch are what seed the per-sample MLM mask.

    `token_dtype` is the index's token_dtype (shards hold the ids as little-endian raw bytes).
    `remote`, `local` and `split` describe one CheckedStream; the other keyword arguments are
    StreamingDataset's.
    """

    _epoch = 0
    failure_file: str | None = None  # set by MLMDataLoader: where a worker leaves its line

    def __init__(
        self,
        *,
        token_dtype: str,
        remote: str | None = None,
        local: str | None = None,
        split: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.token_dtype = np.dtype(token_dtype).newbyteorder("<")
        with one_registration_per_host():  # streaming's prefix search races with other jobs'
            super().__init__(streams=[CheckedStream(remote=remote, local=local, split=split)], **kwargs)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Every process that iterates (main or worker) passes here at the start of an epoch;
        # remember the epoch for get_item. (streaming is pinned, so this hook is stable.)
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # A shard that fails to download, verify or decompress must stop the run with one line.
        # Streaming raises it inside a background thread's callback, where it is swallowed, and
        # leaves the shard PREPARING, where every other reader of it (a thread of this process
        # or another worker) would wait for it forever. Marked LOCAL instead, the shard is
        # prepared again by whoever reads it next, which then fails the same way. No process
        # exits: errors reach the parent through the DataLoader, and a worker also leaves the
        # line in the loader's failure file (an epoch can end early without an error).
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:  # any download, checksum or decompression failure
            shard = self.shards[shard_id]
            name = shard.file_pairs[0][1].basename if shard.file_pairs[0][1] else shard.file_pairs[0][0].basename
            stream = self.streams[self.stream_per_shard[shard_id]]
            where = os.path.join(stream.remote or stream.local, stream.split or "", name)
            message = f"shard {where} is unreadable or damaged ({first_line(err)})"
            # the line is in place before anything can stop on the event set below
            if get_worker_info() is not None and self.failure_file:
                with open(self.failure_file, "a", encoding="utf-8") as f:
                    f.write(message + "\n")  # one short append: lines of two workers never mix
            self._failure = message
            if hasattr(self, "_event"):
                self._event.set()  # this process's streaming threads stop
            self._shard_states[shard_id] = _ShardState.LOCAL
            if threading.current_thread() is not threading.main_thread():
                # streaming's prepare thread: end quietly (a raise here is logged as a traceback
                # by concurrent.futures); the loader raises the line
                return
            raise UserError(message) from None

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry)
        ids = np.frombuffer(sample["input_ids"], dtype=self.token_dtype)
        item = {"input_ids": ids, "index": int(sample_id), "epoch": int(self._epoch)}
        if "doc_lengths" in sample:  # a packed row (convert --pack): its sequences' lengths
            item["doc_lengths"] = decode_lengths(sample["doc_lengths"])
        return item


class MLMDataLoader(StreamingDataLoader):
    """StreamingDataLoader that hands out whole optimizer steps and counts samples, not tokens.

    With `accumulation_steps` A > 1, micro batches are released in groups of A and an epoch's
    last incomplete group is dropped, so every layout (world size x accumulation) ends the epoch
    on the same global-batch boundary. A loader resumed exactly at the end of an epoch goes on
    to the next epoch instead of yielding an empty one.
    """

    def __init__(self, *args: Any, accumulation_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps
        self._resumed = False
        # one file per loader: a line left by another loader's worker is never read as ours
        self._failure_file = os.path.join(tempfile.gettempdir(), f"mosaicbert_ds_loader_failure.{uuid.uuid4().hex}")
        if isinstance(self.dataset, TokenSampleDataset):
            self.dataset.failure_file = self._failure_file

    def _get_batch_size(self, batch: Any) -> int:
        """Stored samples in a batch (packed rows hold several sequences), or in a step's list of them."""
        if isinstance(batch, list):
            return sum(self._get_batch_size(micro) for micro in batch)
        if isinstance(batch, dict) and "samples" in batch:
            return int(batch["samples"])
        if isinstance(batch, dict) and "cu_seqlens" in batch:
            return len(batch["cu_seqlens"]) - 1
        return super()._get_batch_size(batch)

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resumed = True

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._iter_steps()
        except Exception:  # the DataLoader's form of a shard failure in a worker, or streaming's
            self._raise_shard_failure()
            raise
        # the shard failed in a streaming thread, which ends the epoch early without an error
        self._raise_shard_failure()

    def __del__(self) -> None:
        _remove(self.__dict__.get("_failure_file"))  # left when iteration stopped before reading it
        super().__del__()

    def _raise_shard_failure(self) -> None:
        message = self.dataset.__dict__.get("_failure")  # this process's (num_workers=0)
        if os.path.exists(self._failure_file):  # a DataLoader worker's
            if self._iterator is not None:  # stopped first, so no worker goes on reading or writing
                self._iterator._shutdown_workers()
                self._iterator = None
            with open(self._failure_file, encoding="utf-8") as f:
                message = f.readline().strip() or message
            _remove(self._failure_file)
        if message:
            raise UserError(message) from None

    def _iter_steps(self) -> Iterator[Any]:
        resumed, self._resumed = self._resumed, False
        for _ in range(2 if resumed else 1):
            self.num_samples_yielded = 0
            group: list[Any] = []
            for batch in DataLoader.__iter__(self):  # counting happens here, per delivered batch
                group.append(batch)
                if len(group) == self.accumulation_steps:
                    for micro in group:
                        self.num_samples_yielded += self._get_batch_size(micro)
                        yield micro
                    group = []
            if self.num_samples_yielded:
                return


def _remove(path: str | None) -> None:
    if path:
        try:
            os.remove(path)
        except OSError:
            pass


def default_num_canonical_nodes(num_samples: int) -> int:
    """A power of two with at least 4096 samples per canonical node, at most 64.

    It depends on the dataset only (so every world size gets the same order). Streaming repeats
    up to NCN-1 samples per epoch to even out the canonical nodes; keeping several thousand
    samples per node keeps that negligible on small datasets.
    """
    ncn = 1
    while ncn * 2 <= MAX_DEFAULT_CANONICAL_NODES and num_samples >= ncn * 2 * SAMPLES_PER_DEFAULT_CANONICAL_NODE:
        ncn *= 2
    return ncn


def _ensure_local_world_size() -> None:
    # The DeepSpeed launcher exports LOCAL_SIZE; streaming reads LOCAL_WORLD_SIZE and would
    # otherwise take every rank for a node of its own.
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def build_mlm_dataset(
    path: str,
    *,
    split: str | None,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    remote_cache: str | None = None,
    num_canonical_nodes: int | None = None,
    verify_hashes: bool = True,
) -> tuple[TokenSampleDataset, dict[str, Any]]:
    """The streaming dataset of one split and the dataset's index."""
    _ensure_local_world_size()
    info = read_dataset_info(path, remote_cache)
    split = split or "train"
    if split not in info["splits"]:
        raise UserError(f"{path} has no {split!r} split (it has: {', '.join(info['splits'])})")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    ncn = num_canonical_nodes or default_num_canonical_nodes(info["splits"][split]["samples"])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    nodes = max(world_size // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    if ncn % nodes and nodes % ncn:
        raise UserError(
            f"num_canonical_nodes={ncn} and {nodes} nodes: one must divide the other "
            "(use a multiple of every node count you will run on, e.g. 64)"
        )
    if remote_cache is None and not is_remote(path):
        location = {"local": str(path), "remote": None}
    else:  # a URL, or a local folder read like one: shards are copied into the cache
        location = {"local": remote_cache or default_cache_dir(path), "remote": str(path)}
    dataset = TokenSampleDataset(
        **location,
        split=split,
        shuffle=shuffle,
        shuffle_seed=seed,
        batch_size=batch_size,
        num_canonical_nodes=ncn,
        token_dtype=info["token_dtype"],
        # checked as each compressed shard is decompressed (once per node)
        validate_hash=info.get("shard_hash") if verify_hashes else None,
    )
    return dataset, info


def build_mlm_dataloader(
    path: str,
    *,
    split: str | None,
    batch_size: int,
    mlm_probability: float,
    seed: int,
    shuffle: bool = True,
    padded: bool = False,
    num_workers: int = 0,
    remote_cache: str | None = None,
    num_canonical_nodes: int | None = None,
    drop_last: bool = True,
    pad_to: int | None = None,
    accumulation_steps: int = 1,
    verify_hashes: bool = True,
    micro_tokens: int | None = None,
) -> MLMDataLoader:
    """A resumable loader of masked batches for this rank (batch_size is the per-rank micro batch).

    `path` is a converted dataset folder or URL; it is read in place when local and
    `remote_cache` is None, otherwise its shards are cached in `remote_cache`. `seed` seeds both
    the shuffle and the masks; with shuffle=True (training) samples are re-masked every epoch,
    with shuffle=False (evaluation) every pass sees the same order and the same masks.
    `pad_to` fixes the padded width; `accumulation_steps` makes the loader yield only complete
    optimizer steps. `verify_hashes` checks each shard's hash from the index as it is
    decompressed. With `micro_tokens`, each item is instead a list of micro batches: the
    `batch_size` samples read together (for training, this rank's share of one optimizer step)
    split into micro batches of whole samples of at most `micro_tokens` tokens each
    (collator.split_by_tokens); which samples a step holds, their masks and the resume position
    are those of the same batch_size without a budget. A shard that cannot be fetched, verified
    or decompressed raises UserError naming it (also from DataLoader workers). See the module
    docstring for world sizes and resumption.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise UserError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if accumulation_steps < 1:
        raise UserError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
    dataset, info = build_mlm_dataset(
        path,
        split=split,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        remote_cache=remote_cache,
        num_canonical_nodes=num_canonical_nodes,
        verify_hashes=verify_hashes,
    )
    collator = MLMCollator.from_dataset_info(
        info, mlm_probability=mlm_probability, seed=seed, padded=padded, pad_to=pad_to, remask_each_epoch=shuffle
    )
    if micro_tokens is not None:
        if micro_tokens < int(info["max_seq_len"]):
            raise UserError(
                f"micro_tokens {micro_tokens} is below the dataset's max_seq_len {info['max_seq_len']}: "
                "a micro batch must hold at least one whole sample"
            )
        collator = TokenBudgetCollator(collator, micro_tokens)
    return MLMDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        accumulation_steps=accumulation_steps,
        # its own generator: starting an epoch must not draw from the global RNG,
        # which drives dropout and is restored exactly on resume
        generator=torch.Generator().manual_seed(seed),
    )


def sample_tokens(batch: dict[str, Any]) -> list[np.ndarray]:
    """The original (unmasked) token ids of each sequence of a batch (a stored sample, or one
    sequence of a packed row), for tests and debugging."""
    labels, inputs = batch["labels"], batch["input_ids"]
    original = torch.where(labels != IGNORE_INDEX, labels, inputs)
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        return [original[a:b].numpy() for a, b in zip(cu[:-1], cu[1:])]
    lengths = batch["attention_mask"].sum(1).tolist()
    return [row[:n].numpy() for row, n in zip(original, lengths)]
