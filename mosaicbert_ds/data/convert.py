"""`mosaicbert-ds convert`: tokenize a corpus once into MDS shards for pretraining.

    mosaicbert-ds convert data/*.jsonl --tokenizer bert-base-uncased --out /data/mds
    mosaicbert-ds convert --hf-dataset allenai/c4 --hf-config en --val-docs 20000 \
        --tokenizer bert-base-uncased --out /data/c4-128
    mosaicbert-ds convert notes.txt.gz --text-unit paragraph --split-long --tokenizer ./tok --out ./mds

Every document becomes [CLS] tokens [SEP] (max_seq_len 128 by default): truncated as in the
paper, or with --split-long cut into consecutive windows that each get their own [CLS]/[SEP], so
no text is lost. Token ids are stored in the smallest unsigned type that fits the vocabulary.
Documents go to train/ or val/ by a fixed hash of their position in the input (--val-fraction)
or as the first N documents (--val-docs); the same input always gives the same split.

Output and re-runs: the dataset is written to `<out>.partial/` and renamed to `<out>` only when
complete (index last), so a stopped conversion leaves nothing a loader accepts and can simply be
re-run. Re-running into a folder that already holds the same dataset (same input files, sizes
and times, tokenizer and options) does nothing; a different dataset there needs --overwrite.
A non-empty folder that is not a mosaicbert_ds dataset is never replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import UserError
from .encode import SampleSpec, encode_documents, encode_in_worker, init_worker, load_backend_tokenizer
from .hashing import splitmix64, to_unit
from .info import FORMAT, INDEX_NAME, PARTIAL_MARKER, TOKENIZER_DIR, first_line, token_dtype
from .sources import DocumentSource, SourceConfig


@dataclass
class ConvertConfig:
    """One conversion: input, tokenizer, output and how documents become samples."""

    source: SourceConfig
    """Where the documents come from."""
    out: str
    """Output folder (local). Upload it afterwards to read it from object storage."""
    tokenizer: str
    """Hugging Face tokenizer name or folder (must be a fast tokenizer)."""
    max_seq_len: int = 128
    """Tokens per sample including [CLS] and [SEP]."""
    split_long: bool = False
    """Cut long documents into consecutive windows instead of truncating them."""
    val_fraction: float = 0.01
    """Fraction of documents held out in val/ (by a fixed hash of the document number)."""
    val_docs: int | None = None
    """Hold out exactly the first N documents instead (good for already-shuffled corpora like C4)."""
    workers: int | None = None
    """Tokenization processes; default: every core this process may use."""
    shard_size: str = "64mb"
    """Uncompressed bytes per MDS shard."""
    overwrite: bool = False
    """Replace a different dataset already at `out` (or rebuild the same one)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    chunk_docs: int = 512
    """Documents per task handed to a worker."""
    tokenizer_label: str | None = None
    """How the index names the tokenizer (default: `tokenizer`; e.g. when it is a temp folder)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Stored in the index as-is (e.g. which recipe made the dataset)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "    mosaicbert-ds convert data/*.jsonl --tokenizer bert-base-uncased --out /data/mds\n"
                     "    mosaicbert-ds convert --hf-dataset allenai/c4 --hf-config en --val-docs 20000 \\\n"
                     "        --tokenizer bert-base-uncased --out /data/c4-128\n"
                     "    mosaicbert-ds convert notes.txt.gz --text-unit paragraph --split-long --tokenizer ./tok --out ./mds")
    parser.add_argument("inputs", nargs="*", metavar="FILE_OR_GLOB",
                        help="text (.txt, .txt.gz), JSONL or Parquet files, or globs of them")
    hf = parser.add_argument_group("Hugging Face source (instead of files)")
    hf.add_argument("--hf-dataset", help="dataset name, e.g. allenai/c4 (read with streaming=True)")
    hf.add_argument("--hf-config", help="dataset config, e.g. en")
    hf.add_argument("--hf-split", default="train", help="split to read (default: train)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet or HF column (default: text)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                        help="input format (default: from the file suffix)")
    parser.add_argument("--text-unit", default="line", choices=["line", "paragraph"],
                        help="plain text: one document per line, or per blank-line-separated paragraph")
    parser.add_argument("--on-bad-utf8", default="fail", choices=["fail", "skip"],
                        help="what to do with bytes that are not UTF-8 (skip counts and reports them)")
    parser.add_argument("--clean", action="store_true",
                        help="drop lines with box-drawing characters and collapse whitespace")
    parser.add_argument("--min-words", type=int, default=1, help="skip documents with fewer words (default: 1)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or folder (e.g. bert-base-uncased)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-seq-len", type=int, default=128, help="tokens per sample with [CLS]/[SEP] (default: 128)")
    parser.add_argument("--split-long", action="store_true",
                        help="cut long documents into windows instead of truncating them")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None,
                     help="fraction of documents held out in val/ (default: 0.01; 0 for no val/)")
    val.add_argument("--val-docs", type=int, default=None, help="hold out exactly the first N documents")
    parser.add_argument("--workers", type=int, default=None, help="tokenization processes (default: all cores)")
    parser.add_argument("--shard-size", default="64mb", help="uncompressed bytes per shard (default: 64mb)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    source = SourceConfig(paths=list(args.inputs), hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                          hf_split=args.hf_split, text_field=args.text_field, format=args.format,
                          text_unit=args.text_unit, on_bad_utf8=args.on_bad_utf8, clean=args.clean,
                          min_words=args.min_words)
    config = ConvertConfig(source=source, out=args.out, tokenizer=args.tokenizer, max_seq_len=args.max_seq_len,
                           split_long=args.split_long,
                           val_fraction=0.01 if args.val_fraction is None else args.val_fraction,
                           val_docs=args.val_docs, workers=args.workers, shard_size=args.shard_size,
                           overwrite=args.overwrite, progress=not args.quiet)
    convert_corpus(config)
    return 0


# ---- the conversion -----------------------------------------------------------------------
def convert_corpus(config: ConvertConfig) -> dict[str, Any]:
    """Convert `config.source` into a finished dataset at `config.out`; returns its index."""
    _check_options(config)
    reader = DocumentSource(config.source)       # validates files, globs, formats, columns
    tokenizer = _load_tokenizer(config.tokenizer)
    out = Path(config.out).resolve()
    description = {
        "source": config.source.describe(),
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "max_seq_len": config.max_seq_len,
        "truncation": "split" if config.split_long else "truncate",
        "val": {"docs": config.val_docs} if config.val_docs is not None else {"fraction": config.val_fraction},
    }
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    existing = _existing_dataset(out, fingerprint, config.overwrite)
    if existing is not None:
        print(f"{out} already holds this dataset; nothing to do (--overwrite rebuilds it)")
        return existing

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        (partial / PARTIAL_MARKER).write_text("conversion in progress\n")
        tokenizer.save_pretrained(str(partial / TOKENIZER_DIR))
        index = _write_splits(config, reader, tokenizer, partial)
        index.update(format=FORMAT, fingerprint=fingerprint, description=description, **config.extra)
        with open(partial / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _print_summary(index, out)
    return index


def _check_options(config: ConvertConfig) -> None:
    if config.max_seq_len < 3:
        raise UserError(f"--max-seq-len must be at least 3 ([CLS], one token, [SEP]), got {config.max_seq_len}")
    if config.val_docs is not None and config.val_docs < 0:
        raise UserError(f"--val-docs must be 0 or more, got {config.val_docs}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    if config.source.min_words < 0:
        raise UserError(f"--min-words must be 0 or more, got {config.source.min_words}")
    if config.workers is not None and config.workers < 1:
        raise UserError(f"--workers must be at least 1, got {config.workers}")


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # hub, file and config errors all mean "cannot load it"
        raise UserError(f"cannot load tokenizer {name!r}: {first_line(err)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {name!r} has no fast (Rust) version; convert needs one")
    missing = [t for t in ("cls", "sep", "pad", "mask") if getattr(tokenizer, f"{t}_token_id") is None]
    if missing:
        raise UserError(f"tokenizer {name!r} has no {', '.join(f'[{m.upper()}]' for m in missing)} token; "
                        "MLM pretraining needs cls, sep, pad and mask tokens")
    return tokenizer


def _existing_dataset(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The index at `out` if it is this very dataset (and we may keep it); errors for the rest."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    index_file = out / INDEX_NAME
    if index_file.exists() and not (out / PARTIAL_MARKER).exists():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError:
            index = {}
        if index.get("fingerprint") == fingerprint and not overwrite:
            return index
        if not overwrite:
            raise UserError(f"{out} already holds a different dataset; pass --overwrite to replace it "
                            "or choose another --out")
        return None
    if (out / PARTIAL_MARKER).exists() or not any(out.iterdir()):
        return None
    raise UserError(f"{out} is not empty and holds no mosaicbert_ds dataset; choose a new or empty folder")


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished folder into place; the marker goes last so a crash stays visible."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(partial, out)
    os.remove(out / PARTIAL_MARKER)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _val_mask(doc_numbers: np.ndarray, config: ConvertConfig) -> np.ndarray:
    """Which documents are held out: a fixed hash of the document number, or the first N."""
    if config.val_docs is not None:
        return doc_numbers < config.val_docs
    if config.val_fraction <= 0:
        return np.zeros(len(doc_numbers), bool)
    return to_unit(splitmix64(doc_numbers)) < config.val_fraction


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(docs, size)):
        yield chunk


def _encoded_chunks(config: ConvertConfig, reader: DocumentSource, spec: SampleSpec, tokenizer_json: str):
    """(texts, EncodedChunk) in input order, tokenized by a process pool when there are cores."""
    workers = config.workers or _usable_cores()
    chunks = _chunks(iter(reader), config.chunk_docs)
    if workers == 1:
        tok = load_backend_tokenizer(tokenizer_json)
        for texts in chunks:
            yield texts, encode_documents(tok, texts, spec)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, init_worker, (tokenizer_json, spec)) as pool:
        pending: list = []
        for texts in chunks:                  # keep at most 2 tasks per worker in flight
            pending.append((texts, pool.apply_async(encode_in_worker, (texts,))))
            if len(pending) >= 2 * workers:
                texts0, result = pending.pop(0)
                yield texts0, result.get()
        for texts0, result in pending:
            yield texts0, result.get()


def _write_splits(config: ConvertConfig, reader: DocumentSource, tokenizer, root: Path) -> dict[str, Any]:
    from streaming import MDSWriter
    from tqdm import tqdm

    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    spec = SampleSpec(config.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id,
                      config.split_long, dtype)
    names = ["train"] + (["val"] if config.val_docs or (config.val_docs is None and config.val_fraction > 0) else [])
    # Raw bytes of the dtype named in the index: MDS's generic ndarray encoding costs ~6x more
    # per sample, and the single writer process is the converter's bottleneck.
    columns = {"input_ids": "bytes", "length": "uint32"}
    stored = np.dtype(dtype).newbyteorder("<")
    writers = {n: MDSWriter(out=str(root / n), columns=columns, compression="zstd", size_limit=config.shard_size)
               for n in names}
    counts = {n: {"documents": 0, "samples": 0, "tokens": 0} for n in names}
    kept = dropped = truncated_docs = 0
    doc_number = 0
    started = time.time()
    bar = tqdm(desc="convert", unit=" doc", disable=not config.progress, mininterval=0.5, file=sys.stderr)
    for texts, chunk in _encoded_chunks(config, reader, spec, str(root / TOKENIZER_DIR / "tokenizer.json")):
        numbers = np.arange(doc_number, doc_number + len(texts))
        to_val = _val_mask(numbers, config)
        doc_number += len(texts)
        kept += int(chunk.kept_per_doc.sum())
        dropped += int(chunk.dropped_per_doc.sum())
        truncated_docs += int((chunk.dropped_per_doc > 0).sum())
        offsets = np.concatenate([[0], np.cumsum(chunk.sample_lengths)])
        sample = 0
        for d, n_samples in enumerate(chunk.samples_per_doc):
            split = "val" if to_val[d] and "val" in writers else "train"
            writer, count = writers[split], counts[split]
            count["documents"] += int(n_samples > 0)
            for s in range(sample, sample + int(n_samples)):
                ids = chunk.tokens[offsets[s]:offsets[s + 1]]
                writer.write({"input_ids": ids.astype(stored, copy=False).tobytes(), "length": len(ids)})
                count["tokens"] += len(ids)
            count["samples"] += int(n_samples)
            sample += int(n_samples)
        bar.update(len(texts))
        bar.set_postfix_str(f"{(kept + dropped) / max(time.time() - started, 1e-9):,.0f} tok/s", refresh=False)
    bar.close()
    for writer in writers.values():
        writer.finish()

    stats = reader.stats
    source_name = config.source.hf_dataset or ", ".join(config.source.paths)
    if counts["train"]["samples"] == 0 and ("val" not in counts or counts["val"]["samples"] == 0):
        raise UserError(f"no documents with text in {source_name} ({stats.too_short} empty or shorter than "
                        f"--min-words {config.source.min_words}, {stats.bad_utf8} not UTF-8)")
    for name in names:
        if counts[name]["samples"] == 0:
            hint = ("lower --val-docs or --val-fraction" if name == "train"
                    else "raise --val-fraction, use --val-docs, or pass --val-fraction 0 for no val/")
            raise UserError(f"the {name}/ split got no documents out of {stats.documents}; {hint}")

    specials = sorted(set(tokenizer.all_special_ids))
    bracketed = [i for t, i in tokenizer.get_vocab().items() if len(t) > 2 and t[0] == "[" and t[-1] == "]"]
    return {
        "tokenizer": {
            "name_or_path": config.tokenizer_label or config.tokenizer,
            "vocab_size": vocab_size,
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "mask_token_id": tokenizer.mask_token_id,
            "unk_token_id": tokenizer.unk_token_id,
            "special_token_ids": specials,
            # never drawn as MLM random replacements: special tokens and [unusedN]-style entries
            "non_replacement_ids": sorted(set(specials) | set(bracketed)),
            "files": sorted(os.listdir(root / TOKENIZER_DIR)),
        },
        "vocab_size": vocab_size,
        "max_seq_len": config.max_seq_len,
        "truncation": "split" if config.split_long else "truncate",
        "token_dtype": dtype,
        "documents": int(sum(c["documents"] for c in counts.values())),
        "samples": int(sum(c["samples"] for c in counts.values())),
        "tokens_kept": kept,
        "tokens_dropped": dropped,
        "documents_truncated": truncated_docs,
        "skipped": {"bad_utf8": stats.bad_utf8, "empty_or_short": stats.too_short},
        "splits": counts,
        "seconds": round(time.time() - started, 2),
    }


def _print_summary(index: dict[str, Any], out: Path) -> None:
    kept, dropped = index["tokens_kept"], index["tokens_dropped"]
    total = max(kept + dropped, 1)
    splits = ", ".join(f"{n} {c['documents']:,} docs / {c['samples']:,} samples" for n, c in index["splits"].items())
    mode = index["truncation"]
    print(f"converted {index['documents']:,} documents into {index['samples']:,} samples of at most "
          f"{index['max_seq_len']} tokens ({splits}) in {index['seconds']:.1f}s")
    print(f"tokens kept {kept:,} ({100 * kept / total:.1f}%), dropped {dropped:,} ({100 * dropped / total:.1f}%) "
          f"by {mode}" + ("; --split-long would keep them all" if dropped else ""))
    skipped = index["skipped"]
    if skipped["bad_utf8"] or skipped["empty_or_short"]:
        print(f"skipped documents: {skipped['bad_utf8']:,} not UTF-8, {skipped['empty_or_short']:,} empty or short")
    print(f"wrote {out} ({INDEX_NAME}, tokenizer/, {', '.join(n + '/' for n in index['splits'])})")
