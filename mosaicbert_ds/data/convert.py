"""`mosaicbert-ds convert`: tokenize a corpus once into MDS shards for pretraining.

    mosaicbert-ds convert data/*.jsonl --tokenizer bert-base-uncased --out /data/mds
    mosaicbert-ds convert --hf-dataset allenai/c4 --hf-config en --val-docs 20000 \
        --tokenizer bert-base-uncased --out /data/c4-128
    mosaicbert-ds convert notes.txt.gz --text-unit paragraph --split-long --tokenizer ./tok --out ./mds

Every document becomes [CLS] tokens [SEP] (max_seq_len 128 by default): truncated as in the
paper, or with --split-long cut into consecutive windows that each get their own [CLS]/[SEP], so
no text is lost. With --pack, whole sequences are packed into stored rows of up to max_seq_len
tokens with their boundaries kept (packing.py): the loader gives each sequence its own attention
span, and the summary reports the packing efficiency (real tokens / row capacity). Token ids are
stored in the smallest unsigned type that fits the vocabulary.
Documents go to train/ or val/ by a fixed hash of their position in the input (--val-fraction)
or as the first N documents (--val-docs); the same input always gives the same split.

Output and re-runs: the dataset is written to `<out>.partial/` and renamed to `<out>` only when
complete (index last), so a stopped conversion leaves nothing a loader accepts and can simply be
re-run. Re-running into a folder that already holds the same dataset (same input files, sizes
and times, tokenizer and options) does nothing; a different dataset there needs --overwrite.
A non-empty folder that is not a mosaicbert_ds dataset is never replaced, nor is a dataset
holding files `convert` did not write (named in the refusal); `--out` is checked before any
work (`check_convert_destination`: writable, not a run, checkpoint or model folder, not inside
one or inside another dataset). A failure to write (no space, I/O error) is one line, exit code 5. A URL --out (s3://...)
is probed before anything is converted (credentials, endpoint, bucket: see store.py), then the
dataset is staged locally and uploaded (upload.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .blocks import (
    SHARD_HASH,
    BlockSpec,
    block_name,
    init_writer,
    merge_split,
    verify_split,
    write_block,
    write_block_in_worker,
)
from .encode import SampleSpec, load_backend_tokenizer
from .info import (
    FORMAT,
    INDEX_NAME,
    PARTIAL_MARKER,
    TOKENIZER_DIR,
    dataset_problems,
    first_line,
    is_remote,
    token_dtype,
)
from .sources import DocumentSource, SourceConfig
from .unigram import unigram_stats


@dataclass
class ConvertConfig:
    """One conversion: input, tokenizer, output and how documents become samples."""

    source: SourceConfig
    """Where the documents come from."""
    out: str
    """Output folder, or a URL (s3://bucket/prefix, gs://...): written to `stage` and uploaded."""
    tokenizer: str
    """Hugging Face tokenizer name or folder (must be a fast tokenizer)."""
    stage: str | None = None
    """Local folder for a remote `out` (default: a per-URL folder under the temp dir)."""
    max_seq_len: int = 128
    """Tokens per sample including [CLS] and [SEP]."""
    split_long: bool = False
    """Cut long documents into consecutive windows instead of truncating them."""
    pack: bool = False
    """Pack whole sequences into rows of up to max_seq_len tokens, boundaries kept (packing.py)."""
    val_fraction: float = 0.01
    """Fraction of documents held out in val/ (by a fixed hash of the document number)."""
    val_docs: int | None = None
    """Hold out exactly the first N documents instead (good for already-shuffled corpora like C4)."""
    workers: int | None = None
    """Writer processes (each tokenizes and writes whole blocks); default: every usable core."""
    block_docs: int = 32768
    """Documents per block, the unit of parallel work and of the shard layout (see blocks.py)."""
    part: tuple[int, int] | None = None
    """(I, N): write only blocks b with b % N == I; `merge_parts` joins the N parts."""
    shard_size: str = "64mb"
    """Uncompressed bytes per MDS shard."""
    overwrite: bool = False
    """Replace a different dataset already at `out` (or rebuild the same one)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    chunk_docs: int = 512
    """Documents per tokenizer call inside a block."""
    tokenizer_label: str | None = None
    """How the index names the tokenizer (default: `tokenizer`; e.g. when it is a temp folder)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Stored in the index as-is (e.g. which recipe made the dataset)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds convert data/*.jsonl --tokenizer bert-base-uncased --out /data/mds\n"
        "    mosaicbert-ds convert --hf-dataset allenai/c4 --hf-config en --val-docs 20000 \\\n"
        "        --tokenizer bert-base-uncased --out /data/c4-128\n"
        "    mosaicbert-ds convert notes.txt.gz --text-unit paragraph --split-long --tokenizer ./tok --out ./mds\n"
        "    mosaicbert-ds convert data/*.jsonl --max-seq-len 1024 --split-long --pack --tokenizer ./tok --out ./m1024"
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="FILE_OR_GLOB",
        help="text (.txt, .txt.gz), JSONL or Parquet files, or globs of them",
    )
    hf = parser.add_argument_group("Hugging Face source (instead of files)")
    hf.add_argument("--hf-dataset", help="dataset name, e.g. allenai/c4 (read with streaming=True)")
    hf.add_argument("--hf-config", help="dataset config, e.g. en")
    hf.add_argument("--hf-split", default="train", help="split to read (default: train)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet or HF column (default: text)")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "text", "jsonl", "parquet"],
        help="input format (default: from the file suffix)",
    )
    parser.add_argument(
        "--text-unit",
        default="line",
        choices=["line", "paragraph"],
        help="plain text: one document per line, or per blank-line-separated paragraph",
    )
    parser.add_argument(
        "--on-bad-utf8",
        default="fail",
        choices=["fail", "skip"],
        help="what to do with bytes that are not UTF-8 (skip counts and reports them)",
    )
    parser.add_argument(
        "--clean", action="store_true", help="drop lines with box-drawing characters and collapse whitespace"
    )
    parser.add_argument("--min-words", type=int, default=1, help="skip documents with fewer words (default: 1)")
    parser.add_argument("--tokenizer", help="tokenizer name or folder (e.g. bert-base-uncased); required")
    parser.add_argument("--out", help="output folder or URL (s3://bucket/prefix, gs://...); required")
    parser.add_argument("--stage", help="local folder for a URL --out (default: under the temp dir)")
    parser.add_argument(
        "--max-seq-len", type=int, default=128, help="tokens per sample with [CLS]/[SEP] (default: 128)"
    )
    parser.add_argument(
        "--split-long", action="store_true", help="cut long documents into windows instead of truncating them"
    )
    parser.add_argument(
        "--pack",
        action="store_true",
        help="pack whole sequences into rows of up to --max-seq-len tokens; attention stays within each sequence",
    )
    val = parser.add_mutually_exclusive_group()
    val.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of documents held out in val/ (default: 0.01; 0 for no val/)",
    )
    val.add_argument("--val-docs", type=int, default=None, help="hold out exactly the first N documents")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="writer processes, each tokenizing and writing whole blocks (default: all cores)",
    )
    parser.add_argument(
        "--block-docs",
        type=int,
        default=32768,
        help="documents per block, the unit of parallel work and of the layout (default: 32768)",
    )
    parser.add_argument(
        "--part",
        metavar="I/N",
        default=None,
        help="convert only the I-th of N disjoint slices (blocks b with b %% N == I), "
        "for several nodes; join them with --merge",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="OUT PART_DIR",
        default=None,
        help="join finished parts: --merge OUT PART_DIR... (no other input options)",
    )
    parser.add_argument("--shard-size", default="64mb", help="uncompressed bytes per shard (default: 64mb)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--part {text}: need 0 <= I < N")
    return i, n


def main(args: argparse.Namespace) -> int:
    if args.merge is not None:
        if len(args.merge) < 2:
            raise UserError("--merge needs OUT and at least one PART_DIR")
        merge_parts(args.merge[0], args.merge[1:], overwrite=args.overwrite)
        return 0
    if not args.tokenizer or not args.out:
        raise UserError(
            "the following arguments are required: "
            + ", ".join(f"--{n}" for n in ("tokenizer", "out") if not getattr(args, n))
        )
    source = SourceConfig(
        paths=list(args.inputs),
        hf_dataset=args.hf_dataset,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        text_field=args.text_field,
        format=args.format,
        text_unit=args.text_unit,
        on_bad_utf8=args.on_bad_utf8,
        clean=args.clean,
        min_words=args.min_words,
    )
    config = ConvertConfig(
        source=source,
        out=args.out,
        tokenizer=args.tokenizer,
        max_seq_len=args.max_seq_len,
        split_long=args.split_long,
        pack=args.pack,
        val_fraction=0.01 if args.val_fraction is None else args.val_fraction,
        val_docs=args.val_docs,
        workers=args.workers,
        shard_size=args.shard_size,
        block_docs=args.block_docs,
        part=parse_part(args.part) if args.part else None,
        overwrite=args.overwrite,
        progress=not args.quiet,
        stage=args.stage,
    )
    convert_corpus(config)
    return 0


# ---- the conversion -----------------------------------------------------------------------
def convert_corpus(config: ConvertConfig) -> dict[str, Any]:
    """Convert `config.source` into a finished dataset at `config.out`; returns its index."""
    _check_options(config)
    if is_remote(config.out):  # write and publish locally, then upload (index last)
        from .upload import check_upload_target, stage_dir, upload_dataset

        check_upload_target(config.out)  # credentials, endpoint, bucket: before any conversion work
        local = replace(config, out=config.stage or stage_dir(config.out))
        index = convert_corpus(local)
        files = upload_dataset(local.out, config.out, overwrite=config.overwrite)
        if files:
            print(f"uploaded {files} files to {config.out} (local copy: {local.out})")
        else:
            print(f"{config.out} already holds this dataset; nothing uploaded (--overwrite uploads it again)")
        return index
    out = Path(config.out).resolve()
    check_convert_destination(out)
    reader = DocumentSource(config.source)  # validates files, globs, formats, columns
    tokenizer = _load_tokenizer(config.tokenizer)
    description = {
        "source": config.source.describe(),
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "max_seq_len": config.max_seq_len,
        "truncation": "split" if config.split_long else "truncate",
        "val": {"docs": config.val_docs} if config.val_docs is not None else {"fraction": config.val_fraction},
        "layout": {"block_docs": config.block_docs, "shard_size": config.shard_size},
    }
    if config.pack:  # only when set: unpacked datasets keep the fingerprints they always had
        description["pack"] = True
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    if config.part is not None:  # a part is its own output; its dataset is `fingerprint`
        description = {**description, "part": list(config.part)}
    with _writer_lock(out):
        existing = _existing_dataset(out, _fingerprint(description), config.overwrite)
        if existing is not None:
            print(f"{out} already holds this dataset; nothing to do (--overwrite rebuilds it)")
            return existing

        partial = _fresh_partial(out)
        try:
            (partial / PARTIAL_MARKER).write_text("conversion in progress\n")
            tokenizer.save_pretrained(str(partial / TOKENIZER_DIR))
            index = _write_splits(config, reader, tokenizer, partial)
            index.update(
                format=FORMAT,
                fingerprint=_fingerprint(description),
                dataset_fingerprint=fingerprint,
                description=description,
                **config.extra,
            )
            _write_index(partial, index)
            _publish(partial, out)
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            _raise_write_failure(err, out)
            raise
    _print_summary(index, out)
    return index


def _writer_lock(out: Path) -> contextlib.AbstractContextManager:
    """The lock beside `out` that exports and imports take too (train.output_lock): a second
    conversion into the same folder refuses, naming the first, instead of removing its partial
    folder. Where nothing can be written beside `out` there is no lock to take; `_fresh_partial`
    refuses such a place with one line before any work, and a finished dataset there is only read."""
    from ..train.output_lock import OutputLock

    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # the conversion would make it anyway
        return OutputLock.acquire(out.parent / f".{out.name}.mosaicbert-ds.lock", str(out))
    except OSError:
        return contextlib.nullcontext()


def _fingerprint(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _write_index(root: Path, index: dict[str, Any]) -> None:
    with open(root / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


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
    if config.block_docs < 1:
        raise UserError(f"--block-docs must be at least 1, got {config.block_docs}")
    if config.part is not None and not 0 <= config.part[0] < config.part[1]:
        raise UserError(f"--part {config.part[0]}/{config.part[1]}: need 0 <= I < N")


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
        raise UserError(
            f"tokenizer {name!r} has no {', '.join(f'[{m.upper()}]' for m in missing)} token; "
            "MLM pretraining needs cls, sep, pad and mask tokens"
        )
    return tokenizer


def check_convert_destination(out: str | Path) -> None:
    """Before any work: `out` is a folder or can be created, is a place a dataset may go
    (folders.check_destination: not a run, checkpoint or model folder, nor inside one or inside
    another dataset) and, if it exists, is empty or holds a dataset; its `<out>.partial` sibling,
    if any, is an unfinished conversion (which is replaced). Whether it can be written is checked
    once there is work to do (`_fresh_partial`): a dataset already there is not rewritten."""
    from ..folders import check_destination, check_location

    out = Path(out)
    check_location(out, "--out", swapped=True, probe=False)  # writable: checked once there is work to do
    check_destination(out, "dataset")
    if out.is_dir() and any(out.iterdir()) and not ((out / INDEX_NAME).exists() or (out / PARTIAL_MARKER).exists()):
        raise UserError(f"{out} is not empty and holds no mosaicbert_ds dataset; choose a new or empty folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not (
        partial.is_dir() and ((partial / PARTIAL_MARKER).exists() or not any(partial.iterdir()))
    ):
        raise UserError(f"{partial} exists and is not an unfinished conversion; move it away or choose another --out")


def _fresh_partial(out: Path) -> Path:
    """`<out>.partial`, empty, once `out`'s folder is known to be writable: an unfinished conversion
    there is removed (check_convert_destination refused anything else), as are the swap leftovers
    of a killed conversion into `out`."""
    from ..folders import check_location
    from ..outputs import remove_dead_leftovers

    check_location(out, "--out", swapped=True)  # a read-only place: one line, before any conversion
    remove_dead_leftovers(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _raise_write_failure(err: BaseException, out: Path) -> None:
    """An OutputError (exit code 5) when `err` is a failure to write (no space, I/O error)."""
    from ..errors import OutputError
    from ..outputs import write_failure

    reason = write_failure(err, out.parent)
    if reason is not None:
        raise OutputError(f"could not write {out}: {reason}; nothing there was changed") from None


def dataset_extras(out: Path, index: dict[str, Any]) -> list[str]:
    """Names at the top of a dataset folder that `convert` did not write there (the user's)."""
    ours = {INDEX_NAME, TOKENIZER_DIR, PARTIAL_MARKER, *index.get("splits", {})}
    return sorted(p.name for p in out.iterdir() if p.name not in ours)


def _existing_dataset(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The index at `out` if it is this very dataset (and we may keep it); errors for the rest.
    A dataset that is to be replaced must hold nothing but what `convert` wrote."""
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
            problems = dataset_problems(out, index)
            if not problems:
                return index
            check_dataset_extras(out, index)
            print(
                f"{out} holds this dataset but it is damaged ({problems[0]}"
                + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")
                + "); rebuilding it"
            )
            return None
        if not overwrite:
            raise UserError(
                f"{out} already holds a different dataset; pass --overwrite to replace it or choose another --out"
            )
        check_dataset_extras(out, index)
        return None
    if (out / PARTIAL_MARKER).exists() or not any(out.iterdir()):
        return None
    raise UserError(f"{out} is not empty and holds no mosaicbert_ds dataset; choose a new or empty folder")


def check_dataset_extras(out: Path, index: dict[str, Any]) -> None:
    """Refuse to replace a dataset folder holding files `convert` did not write (named)."""
    extras = dataset_extras(out, index)
    if extras:
        more = f" and {len(extras) - 3} more" if len(extras) > 3 else ""
        raise UserError(
            f"refusing to replace the dataset {out}: it holds {', '.join(extras[:3])}{more}, which "
            "`convert` did not write; move them out or choose another --out"
        )


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished folder into place; the marker goes last so a crash stays visible. The
    replaced dataset waits in a temporary sibling (outputs.temporary_sibling) until the swap is done."""
    from ..outputs import temporary_sibling

    old = None
    if out.exists():
        if any(out.iterdir()):
            old = temporary_sibling(out, ".old")
            os.replace(out, old / out.name)
        else:
            out.rmdir()
    os.replace(partial, out)
    os.remove(out / PARTIAL_MARKER)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _blocks(config: ConvertConfig, reader: DocumentSource) -> Iterator[tuple[int, int, list[str]]]:
    """(block, first document number, texts) of the blocks this conversion (or part) writes."""
    docs = iter(reader)
    part, parts = config.part or (0, 1)
    block = 0
    while True:
        if block % parts == part:
            texts = list(islice(docs, config.block_docs))
        else:  # another part's block: read past it (parsing is cheap next to tokenizing)
            texts = [None] * sum(1 for _ in islice(docs, config.block_docs))
        if not texts:
            return
        yield block, block * config.block_docs, texts
        block += 1


def _written_blocks(config: ConvertConfig, reader: DocumentSource, spec: BlockSpec, tokenizer_json: str):
    """The counts of each block, in block order; blocks of other parts give None (still counted)."""
    workers = config.workers or _usable_cores()
    blocks = _blocks(config, reader)
    if workers == 1:
        tok = load_backend_tokenizer(tokenizer_json)
        for block, first, texts in blocks:
            yield (None if texts[0] is None else write_block(tok, spec, block, first, texts)), len(texts)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, init_writer, (tokenizer_json, spec)) as pool:
        pending: list = []
        for block, first, texts in blocks:  # at most 2 blocks per writer in flight
            if texts[0] is None:
                pending.append((None, len(texts)))
            else:
                pending.append((pool.apply_async(write_block_in_worker, (block, first, texts)), len(texts)))
            while len(pending) > 2 * workers or (pending and pending[0][0] is None):
                result, n = pending.pop(0)
                yield (None if result is None else result.get()), n
        for result, n in pending:
            yield (None if result is None else result.get()), n


def _split_names(config: ConvertConfig) -> list[str]:
    has_val = config.val_docs or (config.val_docs is None and config.val_fraction > 0)
    return ["train"] + (["val"] if has_val else [])


def _write_splits(config: ConvertConfig, reader: DocumentSource, tokenizer, root: Path) -> dict[str, Any]:
    from tqdm import tqdm

    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    sample = SampleSpec(
        config.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, config.split_long, dtype, config.pack
    )
    names = _split_names(config)
    spec = BlockSpec(
        str(root), tuple(names), sample, config.shard_size, config.chunk_docs, config.val_docs, config.val_fraction
    )
    counts = {n: {"documents": 0, "samples": 0, "tokens": 0, "sequences": 0} for n in names}
    token_counts = {n: np.zeros(vocab_size, np.int64) for n in names}
    kept = dropped = truncated_docs = 0
    written: list[int] = []
    blocks_total = 0
    started = time.time()
    bar = tqdm(desc="convert", unit=" doc", disable=not config.progress, mininterval=0.5, file=sys.stderr)
    for result, n_docs in _written_blocks(config, reader, spec, str(root / TOKENIZER_DIR / "tokenizer.json")):
        blocks_total += 1
        if result is not None:
            written.append(result["block"])
            kept += result["tokens_kept"]
            dropped += result["tokens_dropped"]
            truncated_docs += result["documents_truncated"]
            for name, count in result["splits"].items():
                for key, value in count.items():
                    counts[name][key] += value
            for name, ids in result["token_counts"].items():
                token_counts[name] = _add_counts(token_counts[name], ids)
            bar.update(n_docs)
            bar.set_postfix_str(f"{(kept + dropped) / max(time.time() - started, 1e-9):,.0f} tok/s", refresh=False)
    bar.close()

    stats = reader.stats
    source_name = config.source.hf_dataset or ", ".join(config.source.paths)
    if config.part is None:
        if counts["train"]["samples"] == 0 and ("val" not in counts or counts["val"]["samples"] == 0):
            raise UserError(
                f"no documents with text in {source_name} ({stats.too_short} empty or shorter than "
                f"--min-words {config.source.min_words}, {stats.bad_utf8} not UTF-8)"
            )
        for name in names:
            if counts[name]["samples"] == 0:
                hint = (
                    "lower --val-docs or --val-fraction"
                    if name == "train"
                    else "raise --val-fraction, use --val-docs, or pass --val-fraction 0 for no val/"
                )
                raise UserError(f"the {name}/ split got no documents out of {stats.documents}; {hint}")
    shards = {}
    for name in names:
        (root / name).mkdir(exist_ok=True)
        shards[name] = merge_split(root / name, written)

    specials = sorted(set(tokenizer.all_special_ids))
    bracketed = [i for t, i in tokenizer.get_vocab().items() if len(t) > 2 and t[0] == "[" and t[-1] == "]"]
    index = {
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
        "packed": config.pack,
        "token_dtype": dtype,
        "shard_hash": SHARD_HASH,
        "block_docs": config.block_docs,
        "blocks": blocks_total,
        "documents": int(sum(c["documents"] for c in counts.values())),
        "samples": int(sum(c["samples"] for c in counts.values())),
        "tokens_kept": kept,
        "tokens_dropped": dropped,
        "documents_truncated": truncated_docs,
        "skipped": {"bad_utf8": stats.bad_utf8, "empty_or_short": stats.too_short},
        "splits": counts,
        "shards": shards,
        "seconds": round(time.time() - started, 2),
    }
    if config.part is None:
        index.update(unigram_stats(token_counts["train"], token_counts.get("val"), vocab_size))
    else:  # the merge computes the unigram levels from every part's counts
        index["part"] = {
            "index": config.part[0],
            "count": config.part[1],
            "written_blocks": written,
            "token_counts": {n: c.tolist() for n, c in token_counts.items()},
        }
    return index


def _add_counts(total: np.ndarray, more: Any) -> np.ndarray:
    more = np.asarray(more, dtype=np.int64)
    if len(more) > len(total):
        total = np.pad(total, (0, len(more) - len(total)))
    total[: len(more)] += more
    return total


def packing_efficiency(index: dict[str, Any]) -> float:
    """Real tokens over the capacity of the stored rows (samples x max_seq_len), over every split."""
    samples = sum(c["samples"] for c in index["splits"].values())
    tokens = sum(c["tokens"] for c in index["splits"].values())
    return tokens / max(samples * index["max_seq_len"], 1)


def _print_summary(index: dict[str, Any], out: Path) -> None:
    kept, dropped = index["tokens_kept"], index["tokens_dropped"]
    total = max(kept + dropped, 1)
    splits = ", ".join(f"{n} {c['documents']:,} docs / {c['samples']:,} samples" for n, c in index["splits"].items())
    mode = index["truncation"]
    print(
        f"converted {index['documents']:,} documents into {index['samples']:,} samples of at most "
        f"{index['max_seq_len']} tokens ({splits}) in {index['seconds']:.1f}s"
    )
    sequences = sum(c.get("sequences", 0) for c in index["splits"].values())
    if index.get("packed"):
        print(
            f"packed {sequences:,} sequences into {index['samples']:,} rows of {index['max_seq_len']} tokens: "
            f"packing efficiency {100 * packing_efficiency(index):.1f}% (real tokens / row capacity)"
        )
    else:
        fill = packing_efficiency(index)
        print(
            f"samples fill {100 * fill:.1f}% of {index['max_seq_len']} tokens on average"
            + ("; --pack would put several sequences in a row" if fill < 0.9 else "")
        )
    print(
        f"tokens kept {kept:,} ({100 * kept / total:.1f}%), dropped {dropped:,} ({100 * dropped / total:.1f}%) "
        f"by {mode}" + ("; --split-long would keep them all" if dropped else "")
    )
    skipped = index["skipped"]
    if skipped["bad_utf8"] or skipped["empty_or_short"]:
        print(f"skipped documents: {skipped['bad_utf8']:,} not UTF-8, {skipped['empty_or_short']:,} empty or short")
    part = index.get("part")
    what = f"part {part['index']}/{part['count']} " if part else ""
    print(f"wrote {what}{out} ({INDEX_NAME}, tokenizer/, {', '.join(n + '/' for n in index['splits'])})")


# ---- joining parts ------------------------------------------------------------------------
def _read_part(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise UserError(f"part {path} does not exist (convert it with --part I/N first)")
    if (path / PARTIAL_MARKER).exists() or not (path / INDEX_NAME).exists():
        raise UserError(f"part {path} is unfinished (no {INDEX_NAME}); re-run its `convert --part`")
    try:
        index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"part {path}: unreadable {INDEX_NAME} ({err})") from None
    if index.get("format") != FORMAT or "part" not in index:
        raise UserError(f"{path} is not a part written by `mosaicbert-ds convert --part I/N`")
    return index


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # parts on the same filesystem: no copy, parts stay intact
    except OSError:
        shutil.copy2(src, dst)


def merge_parts(out: str, part_dirs: list[str], overwrite: bool = False) -> dict[str, Any]:
    """Join the finished parts 0..N-1 of one conversion into one dataset at `out`; returns its index.

    Refuses (UserError) missing, duplicate, unfinished or foreign parts before writing anything.
    The result is the dataset one `convert` without --part would have written.
    """
    paths = [Path(p).resolve() for p in part_dirs]
    parts = {}
    for path in paths:
        index = _read_part(path)
        i, n = index["part"]["index"], index["part"]["count"]
        if i in parts:
            raise UserError(f"part {i}/{n} given twice: {parts[i][0]} and {path}")
        parts[i] = (path, index)
    first_path, first = next(iter(parts.values()))
    count = first["part"]["count"]
    for path, index in parts.values():
        if index["dataset_fingerprint"] != first["dataset_fingerprint"]:
            raise UserError(
                f"{path} and {first_path} are parts of different conversions (input, tokenizer or options differ)"
            )
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise UserError(
            f"cannot merge: part(s) {', '.join(f'{m}/{count}' for m in missing)} missing (got {len(parts)} of {count})"
        )
    blocks = sorted(b for _, index in parts.values() for b in index["part"]["written_blocks"])
    totals = {index["blocks"] for _, index in parts.values()}
    if len(totals) != 1 or blocks != list(range(totals.pop())):
        raise UserError("cannot merge: the parts disagree on the input's blocks; re-run the parts")
    owner = {b: parts[b % count][0] for b in blocks}

    description = {k: v for k, v in first["description"].items() if k != "part"}
    fingerprint = first["dataset_fingerprint"]
    dest = Path(out).resolve()
    if any(dest == p or p in dest.parents for p in paths):
        raise UserError(f"--merge OUT ({dest}) must not be one of the parts or inside one")
    check_convert_destination(dest)
    existing = _existing_dataset(dest, fingerprint, overwrite)
    if existing is not None:
        print(f"{dest} already holds this dataset; nothing to do (--overwrite rebuilds it)")
        return existing

    index = {k: v for k, v in first.items() if k != "part"}
    names = list(first["splits"])
    counts = {n: {"documents": 0, "samples": 0, "tokens": 0, "sequences": 0} for n in names}
    for key in ("documents", "samples", "tokens_kept", "tokens_dropped", "documents_truncated"):
        index[key] = sum(ix[key] for _, ix in parts.values())
    for _, ix in parts.values():
        for name in names:
            for key in counts[name]:
                counts[name][key] += ix["splits"][name].get(key, 0)
    for name in names:
        if counts[name]["samples"] == 0:
            raise UserError(f"the merged {name}/ split has no documents; convert again with other val options")
    index.pop("unigram_entropy", None)
    index.pop("unigram_val_loss", None)
    if all("token_counts" in ix["part"] for _, ix in parts.values()):  # parts of older versions have none
        summed = {n: np.zeros(index["vocab_size"], np.int64) for n in names}
        for _, ix in parts.values():
            for name in names:
                summed[name] = _add_counts(summed[name], ix["part"]["token_counts"][name])
        index.update(unigram_stats(summed["train"], summed.get("val"), index["vocab_size"]))

    partial = _fresh_partial(dest)
    try:
        (partial / PARTIAL_MARKER).write_text("merge in progress\n")
        shutil.copytree(first_path / TOKENIZER_DIR, partial / TOKENIZER_DIR)
        shards = {}
        for name in names:
            (partial / name).mkdir()
            for b in blocks:
                src = owner[b] / name / block_name(b)
                if src.is_dir():
                    for f in sorted(src.iterdir()):
                        _link_or_copy(f, partial / name / block_name(b) / f.name)
            shards[name] = merge_split(partial / name, blocks)
        problems = [p for name in names for p in verify_split(partial / name, hashes=False)]
        if problems:
            raise UserError(f"cannot merge: {problems[0]}")
        index.update(
            splits=counts,
            shards=shards,
            fingerprint=fingerprint,
            description=description,
            seconds=round(sum(ix["seconds"] for _, ix in parts.values()), 2),
        )
        _write_index(partial, index)
        _publish(partial, dest)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        _raise_write_failure(err, dest)
        raise
    _print_summary(index, dest)
    return index
