"""Shared helpers for the data tests: real text, a trained tokenizer, converted datasets.

Everything is made from the bundled Jargon File or written by the tests themselves; nothing
touches the network. The session tokenizer is the one shipped in tests/data/tokenizer (WordPiece
trained on the Jargon File, vocab_size=2000 rounded to 2048), not one trained per run: tokenizers'
WordPiece trainer breaks count ties in hash-map order, so two trainings on the same text can give
different vocabularies, and the loss-curve reference needs the same token ids on every machine.
The datasets several modules read are session fixtures of tests/conftest.py, built once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mosaicbert_ds import cli
from mosaicbert_ds.data import ConvertConfig, SourceConfig, bundled_corpus_path, convert_corpus

_cache: dict[str, Any] = {}


def jargon_docs(n: int = 4000) -> list[str]:
    """Distinct cleaned paragraphs of the bundled corpus (distinct so a sample identifies its document)."""
    if "docs" not in _cache:
        from mosaicbert_ds.data.sources import DocumentSource

        source = SourceConfig(paths=[str(bundled_corpus_path())], text_unit="paragraph", clean=True, min_words=4)
        _cache["docs"] = list(dict.fromkeys(DocumentSource(source)))
    return _cache["docs"][:n]


def long_docs(n: int = 40, paragraphs: int = 30) -> list[str]:
    """`n` documents of `paragraphs` consecutive corpus paragraphs each (about 60 tokens a
    paragraph with the shipped tokenizer): text long enough for 1024- and 2048-token samples."""
    docs = jargon_docs(n * paragraphs)
    return [" ".join(docs[i : i + paragraphs]) for i in range(0, n * paragraphs, paragraphs)]


SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


def tokenizer_dir(tmp_path_factory) -> Path:
    """A copy of the shipped 2048-token WordPiece tokenizer (once per session)."""
    if "tokenizer" not in _cache:
        _cache["tokenizer"] = Path(shutil.copytree(SHIPPED_TOKENIZER, tmp_path_factory.mktemp("tokenizer") / "tok"))
    return _cache["tokenizer"]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "id": len(doc)}) + "\n")
    return path


def convert_docs(
    tmp_path: Path, docs: list[str], name: str = "ds", tokenizer: Path | None = None, **options: Any
) -> Path:
    """Convert `docs` (as JSONL) with the session tokenizer (or `tokenizer`); options go to ConvertConfig."""
    src = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    out = tmp_path / name
    options.setdefault("workers", 1)
    options.setdefault("progress", False)
    convert_corpus(
        ConvertConfig(
            source=SourceConfig(paths=[str(src)]),
            out=str(out),
            tokenizer=str(tokenizer or _cache["tokenizer"]),
            **options,
        )
    )
    return out


def loader_dataset(tmp_path_factory) -> Path:
    """600 documents (64 held out), several shards: the dataset the loader tests share (through
    the session fixture `loader_data` of tests/conftest.py)."""
    tokenizer_dir(tmp_path_factory)
    return convert_docs(tmp_path_factory.mktemp("loader"), jargon_docs(600), val_docs=64, shard_size="24kb")


def read_split(path: Path, split: str) -> list[np.ndarray]:
    """Every stored sample of a split, in storage order, through streaming's own reader."""
    from streaming import StreamingDataset

    dtype = json.loads((Path(path) / "mosaicbert_index.json").read_text())["token_dtype"]
    ds = StreamingDataset(local=str(path), split=split, batch_size=1)
    samples = [
        np.frombuffer(ds[i]["input_ids"], dtype=np.dtype(dtype).newbyteorder("<")) for i in range(ds.num_samples)
    ]
    assert [len(s) for s in samples] == [ds[i]["length"] for i in range(ds.num_samples)]
    return samples


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `mosaicbert-ds ARGV` in-process, as the console script does; (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
