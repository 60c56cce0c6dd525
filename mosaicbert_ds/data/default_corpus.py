"""The bundled corpus (the Jargon File 4.4.7, public domain) as a ready-to-train dataset.

`prepare_default_corpus(out_dir)` is what the quickstart calls: it trains an uncased WordPiece
tokenizer (8192 tokens) on the corpus and converts it (paragraphs of at least 4 words, cleaned
of table rows; 5% held out in val/). It takes seconds on two cores and does nothing when
`out_dir` already holds the dataset made with the same settings.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import UserError
from .info import INDEX_NAME, PARTIAL_MARKER

RECIPE = "jargon-4.4.7/1"


def bundled_corpus_path() -> Path:
    """The gzipped Jargon File shipped inside the package (see corpus/README.md)."""
    return Path(__file__).resolve().parent.parent / "corpus" / "jargon-4.4.7.txt.gz"


def prepare_default_corpus(
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    max_seq_len: int = 128,
    val_fraction: float = 0.05,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Train a tokenizer on the bundled corpus and convert it into a dataset at `out_dir`."""
    from .convert import ConvertConfig, convert_corpus
    from .sources import DocumentSource, SourceConfig
    from .tokenizer import train_tokenizer

    out = Path(out_dir)
    recipe = _recipe(vocab_size, max_seq_len, val_fraction)
    existing = _existing_recipe(out)
    if existing == recipe:
        return out
    source = SourceConfig(paths=[str(bundled_corpus_path())], text_unit="paragraph", clean=True, min_words=4)
    with tempfile.TemporaryDirectory(prefix="mosaicbert-tokenizer-") as tmp:
        train_tokenizer(DocumentSource(source), tmp, vocab_size=vocab_size)
        # A previous default dataset with other settings is ours to replace; anything else is not.
        convert_corpus(
            ConvertConfig(
                source=source,
                out=str(out),
                tokenizer=tmp,
                max_seq_len=max_seq_len,
                val_fraction=val_fraction,
                workers=workers,
                progress=progress,
                tokenizer_label=f"WordPiece {vocab_size} trained on {bundled_corpus_path().name}",
                overwrite=existing is not None,
                extra={"recipe": recipe},
            )
        )
    return out


def _recipe(vocab_size: int, max_seq_len: int, val_fraction: float) -> dict:
    return {"name": RECIPE, "vocab_size": vocab_size, "max_seq_len": max_seq_len, "val_fraction": val_fraction}


def check_default_corpus_destination(
    out_dir: str | Path, *, vocab_size: int = 8192, max_seq_len: int = 128, val_fraction: float = 0.05
) -> None:
    """What `prepare_default_corpus` with these settings would refuse, found before any work: an
    `out_dir` that convert may not write (convert.check_convert_destination), a dataset there that
    this function did not make, or one it would replace that holds files convert did not write."""
    from .convert import check_convert_destination, check_dataset_extras

    out = Path(out_dir)
    check_convert_destination(out)
    existing = _existing_recipe(out)
    if existing == _recipe(vocab_size, max_seq_len, val_fraction):
        return
    index = out / INDEX_NAME
    if index.exists() and not (out / PARTIAL_MARKER).exists():
        if existing is None:
            raise UserError(f"{out} holds a dataset the quickstart did not make; choose another folder")
        check_dataset_extras(out, json.loads(index.read_text(encoding="utf-8")))


def _existing_recipe(out: Path) -> dict | None:
    index = out / INDEX_NAME
    if not index.exists() or (out / PARTIAL_MARKER).exists():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("recipe")
    except ValueError as err:
        raise UserError(f"{index} is not a readable dataset index ({err})") from None
