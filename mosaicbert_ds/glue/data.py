"""GLUE splits from the Hugging Face hub or local files, tokenized once, batched packed or padded.

Local files (--data-dir DIR) are looked up as DIR/<task>/<split file>, the task folder named as
GLUE names it (MNLI, SST-2, STS-B, ...) or as the HF config (mnli, sst2, stsb), any case:
  - GLUE TSV: train.tsv, dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv), with GLUE's
    column layout per task (see tasks.TsvLayout); rows with the wrong number of fields are
    skipped and counted, as GLUE's own loaders do for QQP.
  - JSONL: train.jsonl, validation.jsonl (MNLI: validation_matched.jsonl, ...), one object a
    line with the HF dataset's field names and integer labels (STS-B: a float 0..5).
Without --data-dir the split comes from `nyu-mll/glue` through `datasets`.

A batch is a dict of tensors ready for the model: packed (`input_ids` (T,), `token_type_ids`
(T,), `cu_seqlens` int32 (B + 1,), `max_seqlen` int) for MosaicBERT, or padded (B, L) with
`attention_mask` for a plain Hugging Face BERT; both with `labels` (B,).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .tasks import STS_B_RANGE, Task

HUB_DATASET = "nyu-mll/glue"

_TSV_NAMES = {
    "train": "train",
    "validation": "dev",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
}


@dataclass
class Examples:
    """One split as text: text_b is None for single-sentence tasks."""

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.text_a)


def _task_dir(task: Task, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder")
    wanted = {task.display.lower(), task.name}
    for entry in sorted(data_dir.iterdir()):
        if entry.is_dir() and entry.name.lower() in wanted:
            return entry
    raise UserError(f"no folder for {task.display} in {data_dir} (expected {task.display}/ or {task.name}/)")


def split_file(task: Task, split: str, data_dir: Path) -> Path:
    """The local file holding `split` (an HF split name); UserError naming what was looked for."""
    folder = _task_dir(task, data_dir)
    tsv = _TSV_NAMES[split]
    candidates = [f"{tsv}.tsv", f"{split}.jsonl", f"{tsv}.jsonl"]
    for name in dict.fromkeys(candidates):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"missing {task.display} {split} split: none of {', '.join(dict.fromkeys(candidates))} in {folder}")


def _label_value(task: Task, raw: Any, where: str) -> float | int:
    """A label checked against the task's range; the TSV's label names map to their index."""
    if task.regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {raw!r} is not a number") from None
        lo, hi = STS_B_RANGE
        if not lo <= value <= hi:
            raise UserError(f"{where}: label {value} outside {task.display}'s range {lo:g}..{hi:g}")
        return value
    if isinstance(raw, str) and raw.strip() in task.label_names:
        return task.label_names.index(raw.strip())
    try:
        value = int(str(raw).strip()) if not isinstance(raw, (int, np.integer)) else int(raw)
    except ValueError:
        names = f" or one of {', '.join(task.label_names)}" if task.label_names else ""
        raise UserError(f"{where}: label {raw!r} is not a class number{names}") from None
    if isinstance(raw, bool) or not 0 <= value < task.num_labels:
        raise UserError(f"{where}: label {raw!r} outside {task.display}'s classes 0..{task.num_labels - 1}")
    return value


def _read_tsv(task: Task, path: Path) -> Examples:
    layout = task.tsv
    text_a, text_b, labels, skipped = [], [], [], 0
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) if layout.header else None
        columns = {}
        if header is not None:
            for key in ("text_a", "text_b", "label"):
                name = getattr(layout, key)
                if name is None:
                    continue
                if name not in header:
                    raise UserError(f"{path}: no column {name!r} in the header (a {task.display} TSV needs it)")
                columns[key] = len(header) - 1 - header[::-1].index(name)  # MNLI's gold_label is last
            width = len(header)
        else:
            columns = {k: getattr(layout, k) for k in ("text_a", "text_b", "label") if getattr(layout, k) is not None}
            width = None
        for line_no, row in enumerate(rows, start=2 if header is not None else 1):
            if not row or (width is not None and len(row) != width) or len(row) <= max(columns.values()):
                skipped += 1
                continue
            text_a.append(row[columns["text_a"]])
            if "text_b" in columns:
                text_b.append(row[columns["text_b"]])
            labels.append(_label_value(task, row[columns["label"]], f"{path} line {line_no}"))
    return _examples(task, text_a, text_b, labels, str(path), skipped)


def _read_jsonl(task: Task, path: Path) -> Examples:
    field_a, field_b = task.fields
    text_a, text_b, labels = [], [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not JSON ({err.msg})") from None
            missing = [k for k in (field_a, field_b, "label") if k is not None and k not in row]
            if missing:
                raise UserError(f"{where}: missing field(s) {', '.join(missing)} for {task.display}")
            text_a.append(str(row[field_a]))
            if field_b is not None:
                text_b.append(str(row[field_b]))
            labels.append(_label_value(task, row["label"], where))
    return _examples(task, text_a, text_b, labels, str(path), 0)


def _read_hub(task: Task, split: str) -> Examples:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, task.name, split=split)
    except Exception as err:  # no network, no such split, a hub error: all the user's to fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not load {HUB_DATASET}/{task.name} split {split} ({first}); "
            f"pass --data-dir with GLUE TSV or JSONL files"
        ) from None
    field_a, field_b = task.fields
    where = f"{HUB_DATASET}/{task.name} {split}"
    labels = [_label_value(task, v, f"{where} row {i}") for i, v in enumerate(ds["label"])]
    return _examples(
        task, [str(x) for x in ds[field_a]], [str(x) for x in ds[field_b]] if field_b else None, labels, where, 0
    )


def _examples(task: Task, text_a: list[str], text_b: list[str], labels: list, source: str, skipped: int) -> Examples:
    if not text_a:
        raise UserError(f"{source}: no usable {task.display} examples")
    dtype = np.float32 if task.regression else np.int64
    return Examples(text_a, text_b if task.fields[1] else None, np.asarray(labels, dtype=dtype), source, skipped)


def load_split(task: Task, split: str, data_dir: Path | None, limit: int | None = None) -> Examples:
    """A split by its HF name ("train", "validation", "validation_matched", ...), labels checked."""
    if data_dir is None:
        ex = _read_hub(task, split)
    else:
        path = split_file(task, split, Path(data_dir))
        ex = _read_jsonl(task, path) if path.suffix == ".jsonl" else _read_tsv(task, path)
    if ex.skipped:
        print(f"{ex.source}: skipped {ex.skipped} malformed row(s)", file=sys.stderr)
    if limit is not None and limit < len(ex):
        ex = Examples(
            ex.text_a[:limit],
            ex.text_b[:limit] if ex.text_b is not None else None,
            ex.labels[:limit],
            ex.source,
            ex.skipped,
        )
    return ex


@dataclass
class Tokenized:
    """A split as one flat token stream: example i is ids[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray
    type_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def batch(self, index: np.ndarray, packed: bool, pad_id: int = 0) -> dict[str, Any]:
        """Examples `index` as model inputs (see the module docstring for both layouts)."""
        index = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        lengths = ends - starts
        labels = torch.from_numpy(self.labels[index])
        if packed:
            take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
            cu = np.zeros(len(index) + 1, dtype=np.int32)
            np.cumsum(lengths, out=cu[1:])
            return {
                "input_ids": torch.from_numpy(self.ids[take].astype(np.int64)),
                "token_type_ids": torch.from_numpy(self.type_ids[take].astype(np.int64)),
                "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": int(lengths.max()),
                "labels": labels,
            }
        width = int(lengths.max())
        ids = np.full((len(index), width), pad_id, dtype=np.int64)
        types = np.zeros((len(index), width), dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, (s, e) in enumerate(zip(starts, ends)):
            ids[row, : e - s] = self.ids[s:e]
            types[row, : e - s] = self.type_ids[s:e]
            mask[row, : e - s] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(mask),
            "labels": labels,
        }


def tokenize(tokenizer: Any, examples: Examples, max_length: int, chunk: int = 8192) -> Tokenized:
    """Tokenize with truncation to max_length (longest text of a pair first), no padding."""
    ids, types, lengths = [], [], []
    for start in range(0, len(examples), chunk):
        a = examples.text_a[start : start + chunk]
        b = examples.text_b[start : start + chunk] if examples.text_b is not None else None
        enc = tokenizer(
            a,
            b,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        for i, seq in enumerate(enc["input_ids"]):
            ids.append(np.asarray(seq, dtype=np.int32))
            tt = enc.get("token_type_ids")
            types.append(np.asarray(tt[i], dtype=np.int8) if tt is not None else np.zeros(len(seq), np.int8))
            lengths.append(len(seq))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokenized(np.concatenate(ids), np.concatenate(types), offsets, examples.labels)
