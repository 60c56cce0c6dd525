"""Blocks: the unit of parallel conversion and of a dataset's layout.

The input is cut into consecutive blocks of `block_docs` documents (block b holds documents
b*block_docs ...). Each block is tokenized and written by one process into its own MDS
sub-dataset, `<split>/b<block>/`, and the split's `index.json` lists the blocks in block order
(streaming's `merge_index`). The layout therefore depends only on the input and the options,
never on how many writer processes, nodes or parts produced it: 1 process, 8 writers and
4 parts merged give byte-identical shards in the same order.

Every shard carries an xxh64 hash of its compressed bytes in its index; the loader checks it
when it decompresses the shard, and `verify_split` checks a whole split on disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .encode import SampleSpec, encode_documents, load_backend_tokenizer
from .hashing import splitmix64, to_unit
from .packing import RowPacker, encode_lengths

SHARD_HASH = "xxh64"
COLUMNS = {"input_ids": "bytes", "length": "uint32"}
PACKED_COLUMNS = {**COLUMNS, "doc_lengths": "bytes"}
"""Packed rows also store the lengths of their sequences (packing.py)."""


def block_name(block: int) -> str:
    return f"b{block:07d}"


@dataclass(frozen=True)
class BlockSpec:
    """Everything a writer process needs to turn a block of documents into shards."""

    root: str
    splits: tuple[str, ...]
    sample: SampleSpec
    shard_size: str
    chunk_docs: int
    val_docs: int | None
    val_fraction: float


def val_mask(doc_numbers: np.ndarray, val_docs: int | None, val_fraction: float) -> np.ndarray:
    """Which documents are held out: a fixed hash of the document number, or the first N."""
    if val_docs is not None:
        return doc_numbers < val_docs
    if val_fraction <= 0:
        return np.zeros(len(doc_numbers), bool)
    return to_unit(splitmix64(doc_numbers)) < val_fraction


def write_block(tokenizer, spec: BlockSpec, block: int, first_doc: int, texts: list[str]) -> dict[str, Any]:
    """Tokenize one block and write its samples; returns its counts (per split and tokens) and each
    split's token-id counts without [CLS] and [SEP] (for the dataset's unigram baseline).

    With spec.sample.pack each split's sequences are packed into rows (packing.RowPacker) within
    the block, so the rows depend only on the block's documents."""
    from streaming import MDSWriter

    stored = np.dtype(spec.sample.dtype).newbyteorder("<")
    pack = spec.sample.pack
    writers: dict[str, Any] = {}
    packers = {n: RowPacker(spec.sample.max_seq_len) for n in spec.splits} if pack else {}
    counts = {n: {"documents": 0, "samples": 0, "tokens": 0, "sequences": 0} for n in spec.splits}
    kept = dropped = truncated = 0
    token_ids: dict[str, list[np.ndarray]] = {n: [] for n in spec.splits}  # for the unigram counts

    def write(split: str, sequences: list[np.ndarray]) -> None:
        if split not in writers:  # blocks without samples get no folder
            writers[split] = MDSWriter(
                out=os.path.join(spec.root, split, block_name(block)),
                columns=PACKED_COLUMNS if pack else COLUMNS,
                compression="zstd",
                hashes=[SHARD_HASH],
                size_limit=spec.shard_size,
            )
        ids = sequences[0] if len(sequences) == 1 else np.concatenate(sequences)
        sample = {"input_ids": ids.astype(stored, copy=False).tobytes(), "length": len(ids)}
        if pack:
            sample["doc_lengths"] = encode_lengths([len(s) for s in sequences])
        writers[split].write(sample)
        counts[split]["samples"] += 1
        counts[split]["tokens"] += len(ids)

    for start in range(0, len(texts), spec.chunk_docs):
        chunk_texts = texts[start : start + spec.chunk_docs]
        chunk = encode_documents(tokenizer, chunk_texts, spec.sample)
        numbers = np.arange(first_doc + start, first_doc + start + len(chunk_texts))
        to_val = val_mask(numbers, spec.val_docs, spec.val_fraction)
        kept += int(chunk.kept_per_doc.sum())
        dropped += int(chunk.dropped_per_doc.sum())
        truncated += int((chunk.dropped_per_doc > 0).sum())
        offsets = np.concatenate([[0], np.cumsum(chunk.sample_lengths)])
        sample = 0
        for d, n_samples in enumerate(chunk.samples_per_doc):
            split = "val" if to_val[d] and "val" in counts else "train"
            counts[split]["documents"] += int(n_samples > 0)
            counts[split]["sequences"] += int(n_samples)
            for s in range(sample, sample + int(n_samples)):
                ids = chunk.tokens[offsets[s] : offsets[s + 1]]
                token_ids[split].append(ids[1:-1])  # [CLS] and [SEP] are never masked
                if pack:
                    for row in packers[split].add(ids):
                        write(split, row)
                else:
                    write(split, [ids])
            sample += int(n_samples)
    for split, packer in packers.items():
        for row in packer.flush():
            write(split, row)
    for writer in writers.values():
        writer.finish()
    return {
        "block": block,
        "documents_in": len(texts),
        "splits": counts,
        "tokens_kept": kept,
        "tokens_dropped": dropped,
        "documents_truncated": truncated,
        "token_counts": {
            n: np.bincount(np.concatenate(ids).astype(np.int64)) if ids else np.zeros(0, np.int64)
            for n, ids in token_ids.items()
        },
    }


def merge_split(split_dir: Path, blocks: list[int]) -> int:
    """Write `split_dir/index.json` listing the blocks' shards in block order; returns the shard count."""
    from streaming.base.util import merge_index

    present = [split_dir / block_name(b) / "index.json" for b in blocks]
    present = [str(p) for p in present if p.exists()]
    if not present:
        return 0
    logging.disable(logging.WARNING)  # merge_index logs its temporary folder on every call
    try:
        merge_index(present, str(split_dir), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)
    return len(json.loads((split_dir / "index.json").read_text())["shards"])


def verify_split(split_dir: Path, hashes: bool = True) -> list[str]:
    """Problems of one split on disk: missing or resized shard files and, with `hashes`, bad hashes."""
    import xxhash

    index_file = split_dir / "index.json"
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{index_file}: unreadable index ({err.__class__.__name__})"]
    problems = []
    for shard in shards:
        info = shard.get("zip_data") or shard["raw_data"]
        path = split_dir / info["basename"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the index says {info['bytes']}")
        elif hashes and SHARD_HASH in info.get("hashes", {}):
            digest = xxhash.xxh64()
            with open(path, "rb") as f:
                while data := f.read(1 << 22):
                    digest.update(data)
            if digest.hexdigest() != info["hashes"][SHARD_HASH]:
                problems.append(f"{path}: {SHARD_HASH} hash differs from the index")
    return problems


# ---- process pool plumbing ----------------------------------------------------------------
_state: dict = {}


def init_writer(tokenizer_json: str, spec: BlockSpec) -> None:
    """Pool initializer: one tokenizer per writer process, Rust threads off (the pool is the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _state["tokenizer"] = load_backend_tokenizer(tokenizer_json)
    _state["spec"] = spec


def write_block_in_worker(block: int, first_doc: int, texts: list[str]) -> dict[str, Any]:
    return write_block(_state["tokenizer"], _state["spec"], block, first_doc, texts)
