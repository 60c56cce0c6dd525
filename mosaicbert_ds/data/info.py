"""Where a converted dataset lives and what its index says.

A finished dataset is a folder (local, or remote as streaming understands it: s3://, gs://, ...)

    mosaicbert_index.json   our index: tokenizer, max_seq_len, counts, splits (written last)
    tokenizer/              the tokenizer, saved with save_pretrained (no network needed later)
    train/ val/             streaming MDS sub-datasets, one sample per [CLS] ... [SEP] sequence
                            (or, with convert --pack, per row of several such sequences):
                            input_ids (bytes: little-endian ids of the index's token_dtype),
                            length (uint32, tokens in the sample), and for packed rows
                            doc_lengths (bytes: little-endian uint32 lengths of its sequences)

A conversion in progress writes to `<out>.partial/` with a marker file and only renames it to
`<out>` at the end, so a stopped conversion never looks finished; `read_dataset_info` refuses
folders without the index or with the marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError

INDEX_NAME = "mosaicbert_index.json"
PARTIAL_MARKER = ".mosaicbert_partial"
TOKENIZER_DIR = "tokenizer"
FORMAT = "mosaicbert_ds.mds/1"


def is_remote(path: str) -> bool:
    """True for URLs (s3://, gs://, oci://, ...) that streaming downloads from."""
    return "://" in str(path)


def default_cache_dir(remote: str) -> str:
    """A per-URL cache folder under the temp dir, the same on every rank of a node."""
    digest = hashlib.sha1(str(remote).rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mosaicbert_ds_cache", digest)


def _fetch(remote_file: str, local_file: str) -> None:
    """Download one file over any cached copy (the remote may have been re-converted).

    Every rank of a node may fetch at once: each downloads to its own temporary name and renames
    it into place, so no reader ever sees a half-written file.
    """
    from streaming.base.storage import CloudDownloader

    tmp = f"{local_file}.{os.getpid()}.tmp"
    CloudDownloader.direct_download(remote_file, tmp)
    os.replace(tmp, local_file)


def first_line(err: BaseException) -> str:
    """An exception as one line, for UserError messages that wrap library errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def probe_remote(url: str) -> None:
    """After a failed fetch: raise the store's own one-line error (credentials, endpoint, bucket), if any."""
    from .store import probe_store

    probe_store(url, "read")


def read_dataset_info(path: str, remote_cache: str | None = None) -> dict[str, Any]:
    """Read the index of a finished dataset, so loaders and the trainer never guess its layout.

    `path` is a local folder or a remote URL; for URLs the index and tokenizer are fetched into
    `remote_cache` (default: a per-URL folder under the temp dir). Besides the stored index
    (see convert.py) the dict has `tokenizer_dir`, a local folder holding the tokenizer.
    Raises UserError if there is no finished dataset at `path`.
    """
    path = str(path)
    if is_remote(path):
        cache = remote_cache or default_cache_dir(path)
        local_index = os.path.join(cache, INDEX_NAME)
        try:
            _fetch(path.rstrip("/") + "/" + INDEX_NAME, local_index)
        except Exception as err:  # the store's own problems first, then "not a finished dataset"
            probe_remote(path)
            raise UserError(
                f"{path} holds no finished mosaicbert_ds dataset (could not fetch {INDEX_NAME}: {first_line(err)})"
            ) from None
    else:
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"{path} is not a folder; convert a corpus there with `mosaicbert-ds convert`")
        if (root / PARTIAL_MARKER).exists():
            raise UserError(f"{path} holds an unfinished conversion; re-run `mosaicbert-ds convert`")
        local_index = str(root / INDEX_NAME)
        if not os.path.exists(local_index):
            raise UserError(
                f"{path} holds no finished mosaicbert_ds dataset (no {INDEX_NAME}); "
                "convert a corpus there with `mosaicbert-ds convert`"
            )
    try:
        with open(local_index, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{local_index} is not a readable dataset index ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{local_index} is not a {FORMAT} index")
    if "part" in info:
        raise UserError(
            f"{path} is part {info['part']['index']}/{info['part']['count']} of a conversion, not a "
            "whole dataset; join the parts with `mosaicbert-ds convert --merge OUT PART_DIR...`"
        )
    if is_remote(path):
        folder = os.path.join(cache, TOKENIZER_DIR)
        for name in info["tokenizer"]["files"]:
            try:
                _fetch(f"{path.rstrip('/')}/{TOKENIZER_DIR}/{name}", os.path.join(folder, name))
            except Exception as err:  # as above: the store refuses, or the dataset is incomplete
                probe_remote(path)
                raise UserError(f"{path}: could not fetch {TOKENIZER_DIR}/{name} ({first_line(err)})") from None
    else:
        folder = os.path.join(os.path.abspath(path), TOKENIZER_DIR)
    info["tokenizer_dir"] = folder  # a local folder in both cases, for AutoTokenizer and export
    try:
        info["identity"] = dataset_identity(local_index, folder, info["tokenizer"]["files"])
    except OSError as err:
        raise UserError(
            f"{path}: cannot read its tokenizer ({first_line(err)}); re-run `mosaicbert-ds convert`"
        ) from None
    return info


def dataset_identity(index_file: str, tokenizer_dir: str, tokenizer_files: list[str]) -> dict[str, str]:
    """What a checkpoint records of its training data: sha256 of the dataset index (counts, splits,
    shard hashes) and of the tokenizer's files, so a resume on other data is noticed."""
    tokenizer = hashlib.sha256()
    for name in sorted(tokenizer_files):
        tokenizer.update(name.encode() + b"\0")
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            tokenizer.update(f.read())
    with open(index_file, "rb") as f:
        index = hashlib.sha256(f.read()).hexdigest()
    return {"index": index, "tokenizer": tokenizer.hexdigest()}


def load_tokenizer(path: str, remote_cache: str | None = None):
    """The tokenizer saved with a dataset, loaded offline (fetched into the cache for URLs)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(read_dataset_info(path, remote_cache)["tokenizer_dir"])


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned numpy dtype that holds every token id (uint16 for BERT's 30522)."""
    for name, limit in (("uint8", 1 << 8), ("uint16", 1 << 16), ("uint32", 1 << 32)):
        if vocab_size <= limit:
            return name
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large")


def dataset_problems(root: Path, index: dict[str, Any], hashes: bool = True) -> list[str]:
    """What is wrong with a local finished dataset's shards (missing, resized, bad hash); [] if nothing."""
    from .blocks import verify_split

    problems = []
    for split in index.get("splits", {}):
        problems += verify_split(Path(root) / split, hashes=hashes)
    return problems


def check_dataset(
    path: str, splits: list[str] | None = None, remote_cache: str | None = None, hashes: bool = False
) -> dict[str, Any]:
    """Check that a (local or remote) dataset is readable and every split in `splits` has an index.

    For a URL it fetches our index, the tokenizer and each split's `index.json` (small files,
    no shards) into the cache, so unreachable stores, wrong credentials and buckets without an
    index fail here with one UserError line. For a local folder it also checks that every shard
    file exists with the size the index gives (and, with `hashes`, its xxh64 hash). Returns the
    dataset info as `read_dataset_info` does.
    """
    info = read_dataset_info(path, remote_cache)
    splits = list(info["splits"]) if splits is None else splits
    for split in splits:
        if split not in info["splits"]:
            raise UserError(f"{path} has no {split!r} split (it has: {', '.join(info['splits'])})")
        if is_remote(path):
            local = os.path.join(remote_cache or default_cache_dir(path), split, "index.json")
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                _fetch(f"{str(path).rstrip('/')}/{split}/index.json", local)
                json.loads(Path(local).read_text())["shards"]
            except Exception as err:  # as above: the store refuses, or the split index is missing
                probe_remote(path)
                raise UserError(f"{path}: cannot read {split}/index.json ({first_line(err)})") from None
        else:
            from .blocks import verify_split

            problems = verify_split(Path(path) / split, hashes=hashes)
            if problems:
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                raise UserError(f"{path} is damaged: {problems[0]}{more}; re-run `mosaicbert-ds convert`")
    return info
