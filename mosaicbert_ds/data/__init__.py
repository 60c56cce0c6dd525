"""The data pipeline: text -> MDS shards (`convert`, `tokenizer`) -> masked MLM batches.

read_dataset_info(path, remote_cache=None) -> dict
check_dataset(path, splits=None, remote_cache=None, hashes=False) -> dict   (UserError if unusable)
load_tokenizer(path, remote_cache=None) -> transformers tokenizer
build_mlm_dataloader(path, *, split, batch_size, mlm_probability, seed, ...) -> MLMDataLoader
MLMCollator, TokenSampleDataset, MLMDataLoader, default_num_canonical_nodes
convert_corpus(ConvertConfig) -> index dict;  merge_parts(out, part_dirs) -> index dict
upload_dataset(local, url) -> files uploaded;  train_tokenizer(texts, out_dir, vocab_size) -> Path
prepare_default_corpus(out_dir) -> Path   (the bundled Jargon File, for the quickstart)
probe_store(url, action) -> None   (UserError naming credentials, endpoint or bucket; s3:// only)
"""

from __future__ import annotations

from .collator import MLMCollator
from .convert import ConvertConfig, convert_corpus, merge_parts
from .dataset import (
    MLMDataLoader,
    TokenSampleDataset,
    build_mlm_dataloader,
    build_mlm_dataset,
    default_num_canonical_nodes,
    sample_tokens,
)
from .default_corpus import bundled_corpus_path, prepare_default_corpus
from .info import INDEX_NAME, check_dataset, load_tokenizer, read_dataset_info
from .sources import SourceConfig
from .store import probe_store
from .tokenizer import train_tokenizer
from .upload import upload_dataset

__all__ = [
    "INDEX_NAME",
    "ConvertConfig",
    "MLMCollator",
    "MLMDataLoader",
    "SourceConfig",
    "TokenSampleDataset",
    "build_mlm_dataloader",
    "build_mlm_dataset",
    "bundled_corpus_path",
    "check_dataset",
    "convert_corpus",
    "default_num_canonical_nodes",
    "load_tokenizer",
    "merge_parts",
    "prepare_default_corpus",
    "probe_store",
    "read_dataset_info",
    "sample_tokens",
    "train_tokenizer",
    "upload_dataset",
]
