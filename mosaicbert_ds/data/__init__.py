"""The data pipeline: text -> MDS shards (`convert`, `tokenizer`) -> masked MLM batches.

Public names are imported lazily, so `mosaicbert-ds tokenizer` does not pay for streaming/torch.

    read_dataset_info(path, remote_cache=None) -> dict
    check_dataset(path, splits=None, remote_cache=None, hashes=False) -> dict   (UserError if unusable)
    load_tokenizer(path, remote_cache=None) -> transformers tokenizer
    build_mlm_dataloader(path, *, split, batch_size, mlm_probability, seed, ...) -> MLMDataLoader
    MLMCollator, TokenSampleDataset, MLMDataLoader, default_num_canonical_nodes
    convert_corpus(ConvertConfig) -> index dict;  merge_parts(out, part_dirs) -> index dict
    upload_dataset(local, url, overwrite=False) -> files uploaded (0: the URL holds this dataset)
    probe_store(url, action) -> None   (UserError naming credentials, endpoint or bucket; s3:// only)
    train_tokenizer(texts, out_dir, vocab_size) -> Path
    prepare_default_corpus(out_dir) -> Path   (the bundled Jargon File, for the quickstart)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_dataset_info": "info",
    "load_tokenizer": "info",
    "INDEX_NAME": "info",
    "check_dataset": "info",
    "MLMCollator": "collator",
    "TokenSampleDataset": "dataset",
    "MLMDataLoader": "dataset",
    "build_mlm_dataloader": "dataset",
    "build_mlm_dataset": "dataset",
    "default_num_canonical_nodes": "dataset",
    "sample_tokens": "dataset",
    "ConvertConfig": "convert",
    "convert_corpus": "convert",
    "merge_parts": "convert",
    "SourceConfig": "sources",
    "upload_dataset": "upload",
    "probe_store": "store",
    "train_tokenizer": "tokenizer",
    "prepare_default_corpus": "default_corpus",
    "bundled_corpus_path": "default_corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
