"""Documents -> [CLS] tokens [SEP] samples: the tokenization workers of `mosaicbert-ds convert`.

Kept free of torch/transformers/streaming imports so pool workers start fast: a worker loads
the saved `tokenizer.json` with the `tokenizers` library (the same Rust tokenizer the
transformers fast tokenizer wraps) and encodes a chunk of documents with `encode_batch`.

Literal special-token strings in the text ("[SEP]" in a web page) are tokenized as text
(`encode_special_tokens`), so the only special tokens in a sample are the ones we add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleSpec:
    """How token ids become samples."""

    max_seq_len: int
    cls_id: int
    sep_id: int
    split_long: bool
    dtype: str
    pack: bool = False
    """Pack whole sequences into rows of at most max_seq_len tokens (packing.py)."""


@dataclass
class EncodedChunk:
    """A chunk of documents as samples, flattened so it pickles cheaply between processes."""

    tokens: np.ndarray  # all samples of the chunk concatenated (dtype of the dataset)
    sample_lengths: np.ndarray  # int64 (S,), lengths including [CLS]/[SEP]
    samples_per_doc: np.ndarray  # int64 (D,), 0 for documents that produced no tokens
    kept_per_doc: np.ndarray  # int64 (D,), content tokens stored
    dropped_per_doc: np.ndarray  # int64 (D,), content tokens lost to truncation


def document_samples(ids: list[int], spec: SampleSpec) -> tuple[list[list[int]], int]:
    """[CLS] ids [SEP] for one document: truncated, or cut into consecutive windows.

    Returns the samples and the number of content tokens dropped. A document with no tokens
    gives no samples.
    """
    room = spec.max_seq_len - 2
    if not ids:
        return [], 0
    if not spec.split_long:
        return [[spec.cls_id, *ids[:room], spec.sep_id]], max(len(ids) - room, 0)
    return [[spec.cls_id, *ids[i : i + room], spec.sep_id] for i in range(0, len(ids), room)], 0


def encode_documents(tokenizer, texts: list[str], spec: SampleSpec) -> EncodedChunk:
    """Tokenize a batch of documents (no special tokens) and cut them into samples."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    samples: list[list[int]] = []
    per_doc, kept, dropped = [], [], []
    for enc in encodings:
        doc_samples, lost = document_samples(enc.ids, spec)
        samples += doc_samples
        per_doc.append(len(doc_samples))
        kept.append(len(enc.ids) - lost)
        dropped.append(lost)
    lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
    flat = np.fromiter((t for s in samples for t in s), dtype=spec.dtype, count=int(lengths.sum()))
    return EncodedChunk(
        flat, lengths, np.asarray(per_doc, np.int64), np.asarray(kept, np.int64), np.asarray(dropped, np.int64)
    )


def load_backend_tokenizer(tokenizer_json: str):
    """The Rust tokenizer saved beside the transformers files, set up for raw content ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True
    return tok


# ---- process pool plumbing ----------------------------------------------------------------
_worker_state: dict = {}


def init_worker(tokenizer_json: str, spec: SampleSpec) -> None:
    """Pool initializer: one tokenizer per process, Rust threads off (the pool is the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["tokenizer"] = load_backend_tokenizer(tokenizer_json)
    _worker_state["spec"] = spec


def encode_in_worker(texts: list[str]) -> EncodedChunk:
    return encode_documents(_worker_state["tokenizer"], texts, _worker_state["spec"])
