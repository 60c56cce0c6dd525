"""Documents out of local files (text, JSONL, Parquet; .gz text too) or a Hugging Face dataset.

`DocumentSource` validates what it can up front (files exist, globs match, the format is known,
the text column exists) and then yields one string per document, keeping counts of what it
skipped (bad UTF-8, empty or too short) so the converter can report them. Problems with the
user's input raise UserError with one sentence that names the file and line; a file that cannot be
read to its end (a truncated .gz, a damaged Parquet file) names the file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import UserError
from .info import first_line

FORMATS = ("auto", "text", "jsonl", "parquet")
_SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
# Box drawing (U+2500-U+257F) and block elements (U+2580-U+259F): table rules and borders.
_BOX_DRAWING = re.compile("[\u2500-\u259f]")


@dataclass
class SourceConfig:
    """What to read and how to cut it into documents."""

    paths: list[str] = field(default_factory=list)
    """Local files or globs (`data/*.jsonl`, `**/*.txt.gz`); empty when reading from the Hub."""
    hf_dataset: str | None = None
    """Hugging Face dataset name or local dataset folder, read with streaming=True."""
    hf_config: str | None = None
    """Hugging Face dataset config (e.g. `en` for allenai/c4)."""
    hf_split: str = "train"
    """Hugging Face split to read."""
    text_field: str = "text"
    """Column (Parquet, Hugging Face) or field (JSONL) that holds the text."""
    format: str = "auto"
    """auto (from the file suffix), text, jsonl or parquet."""
    text_unit: str = "line"
    """For plain text: a document per `line`, or per blank-line-separated `paragraph`."""
    on_bad_utf8: str = "fail"
    """`fail` stops with the file and line; `skip` drops the document and counts it."""
    clean: bool = False
    """Drop lines with box-drawing characters (tables) and collapse whitespace."""
    min_words: int = 1
    """Documents with fewer whitespace-separated words are skipped (and counted)."""

    def describe(self) -> dict[str, Any]:
        """What identifies this input, for the dataset index and the re-run check."""
        desc: dict[str, Any] = {
            k: getattr(self, k) for k in ("text_field", "format", "text_unit", "on_bad_utf8", "clean", "min_words")
        }
        if self.hf_dataset:
            desc["hf"] = {"name": self.hf_dataset, "config": self.hf_config, "split": self.hf_split}
        else:
            desc["files"] = [
                {"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                for p in resolve_files(self.paths)
            ]
        return desc


@dataclass
class ReadStats:
    """What the reader skipped, reported by the converter and stored in the index."""

    documents: int = 0
    bad_utf8: int = 0
    too_short: int = 0


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand paths and globs in order; a missing file or an empty glob is the user's error."""
    if not patterns:
        raise UserError("no input: pass files or globs, or --hf-dataset NAME")
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{pattern!r} matches no files")
            files += [Path(m).resolve() for m in matches]
        elif os.path.isdir(pattern):
            raise UserError(f"{pattern} is a folder; pass its files or a glob such as {pattern}/*.txt")
        elif not os.path.isfile(pattern):
            raise UserError(f"no such file: {pattern}")
        else:
            files.append(Path(pattern).resolve())
    return files


def file_format(path: Path, forced: str) -> str:
    """The format of one file: forced by --format, or read from its suffix (ignoring .gz)."""
    if forced != "auto":
        return forced
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise UserError(f"cannot tell the format of {path} from its name; pass --format text|jsonl|parquet")
    return fmt


def clean_text(text: str) -> str:
    """Make text more like prose: drop table rows and rules, collapse all whitespace."""
    lines = [line for line in text.splitlines() if not _BOX_DRAWING.search(line)]
    return " ".join(" ".join(lines).split())


def _open_binary(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


class DocumentSource:
    """Iterate the documents of a SourceConfig, counting what was skipped in `stats`."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.stats = ReadStats()
        if config.format not in FORMATS:
            raise UserError(f"unknown --format {config.format!r}; choose one of {', '.join(FORMATS)}")
        if config.on_bad_utf8 not in ("fail", "skip"):
            raise UserError("--on-bad-utf8 must be fail or skip")
        if config.text_unit not in ("line", "paragraph"):
            raise UserError("--text-unit must be line or paragraph")
        if config.hf_dataset:
            if config.paths:
                raise UserError("pass either files or --hf-dataset, not both")
            self.files: list[tuple[Path, str]] = []
        else:
            self.files = [(p, file_format(p, config.format)) for p in resolve_files(config.paths)]
            for path, fmt in self.files:
                if fmt == "parquet":
                    self._check_parquet_column(path)

    def __iter__(self) -> Iterator[str]:
        raw = self._iter_hf() if self.config.hf_dataset else self._iter_files()
        for text in raw:
            if text is None:
                continue
            if self.config.clean:
                text = clean_text(text)
            if len(text.split()) < max(self.config.min_words, 1):
                self.stats.too_short += 1
                continue
            self.stats.documents += 1
            yield text

    # ---- decoding -------------------------------------------------------------------------
    def _decode(self, data: bytes, where: str) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.config.on_bad_utf8 == "skip":
                self.stats.bad_utf8 += 1
                return None
            raise UserError(
                f"{where} is not valid UTF-8 (byte {err.start}: {data[err.start : err.start + 1]!r}); "
                "fix the file or pass --on-bad-utf8 skip"
            ) from None

    # ---- local files ----------------------------------------------------------------------
    def _iter_files(self) -> Iterator[str | None]:
        for path, fmt in self.files:
            read = {"text": self._iter_text, "jsonl": self._iter_jsonl}.get(fmt, self._iter_parquet)
            try:
                yield from read(path)
            except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt file (.gz too)
                raise UserError(f"{path} cannot be read: it is truncated or corrupt ({first_line(err)})") from None
            except Exception as err:
                if type(err).__module__.startswith("pyarrow"):  # Parquet's own errors for damaged files
                    raise UserError(f"{path} cannot be read: it is truncated or corrupt ({first_line(err)})") from None
                raise

    def _iter_text(self, path: Path) -> Iterator[str | None]:
        with _open_binary(path) as f:
            if self.config.text_unit == "line":
                for lineno, line in enumerate(f, 1):
                    if lineno == 1:
                        line = line.removeprefix(b"\xef\xbb\xbf")
                    yield self._decode(line.rstrip(b"\r\n"), f"{path}:{lineno}")
                return
            block: list[bytes] = []
            start = 1
            for lineno, line in enumerate(f, 1):
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if line.strip():
                    if not block:
                        start = lineno
                    block.append(line.rstrip(b"\r\n"))
                elif block:
                    yield self._decode(b"\n".join(block), f"{path}:{start}")
                    block = []
            if block:
                yield self._decode(b"\n".join(block), f"{path}:{start}")

    def _iter_jsonl(self, path: Path) -> Iterator[str | None]:
        field_name = self.config.text_field
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                text = self._decode(line, where)
                if text is None:
                    continue
                try:
                    record = json.loads(text)
                except ValueError:
                    raise UserError(f"{where} is not a JSON object (expected one object per line)") from None
                if not isinstance(record, dict) or field_name not in record:
                    fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise UserError(
                        f"{where} has no field {field_name!r} (found: {fields}); pass --text-field"
                    ) from None
                value = record[field_name]
                if value is not None and not isinstance(value, str):
                    raise UserError(f"{where}: field {field_name!r} is {type(value).__name__}, not text")
                yield value

    def _check_parquet_column(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise UserError(f"{path} is not a readable Parquet file ({first_line(err)})") from None
        if self.config.text_field not in names:
            raise UserError(
                f"{path} has no column {self.config.text_field!r} (columns: {', '.join(names)}); pass --text-field"
            )

    def _iter_parquet(self, path: Path) -> Iterator[str | None]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(columns=[self.config.text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, bytes):
                    value = self._decode(value, f"{path} row {row}")
                yield value

    # ---- Hugging Face ---------------------------------------------------------------------
    def _iter_hf(self) -> Iterator[str | None]:
        cfg = self.config
        try:
            import datasets

            stream = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
            rows = iter(stream)
            first = next(rows, None)
        except Exception as err:  # the Hub and builders raise many types; all mean "cannot open"
            raise UserError(
                f"cannot read Hugging Face dataset {cfg.hf_dataset!r} "
                f"(config {cfg.hf_config!r}, split {cfg.hf_split!r}): {first_line(err)}"
            ) from None
        if first is None:
            return
        if cfg.text_field not in first:
            raise UserError(
                f"Hugging Face dataset {cfg.hf_dataset!r} has no column {cfg.text_field!r} "
                f"(columns: {', '.join(first)}); pass --text-field"
            )
        yield first[cfg.text_field]
        for record in rows:
            yield record[cfg.text_field]
