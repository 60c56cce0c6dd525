"""`mosaicbert-ds pareto`: average GLUE (dev) against pretraining hours for checkpoints of a run.

    mosaicbert-ds pareto checkpoints.json --out runs/pareto            # finetune each, then plot
    mosaicbert-ds pareto checkpoints.csv --out runs/pareto --metrics run/metrics.jsonl --seeds 3
    mosaicbert-ds pareto checkpoints.json --out runs/pareto --no-finetune   # plot what is there

The listing is JSON (a list of objects, or {"checkpoints": [...]}) or CSV with a header row,
one checkpoint per entry, paths relative to the listing's folder:
    path     transformers folder, or trainer checkpoint: a run's checkpoints/ folder (its latest
             tag) or one tag folder, e.g. run/checkpoints/step_0003500 (optional with `results`)
    hours    pretraining wall-clock hours at the checkpoint; when absent, a trainer checkpoint's
             own trainer_state.json (train_seconds) gives them, or else
    step     its step, with hours read from --metrics (the trainer's metrics.jsonl, or any JSONL
             whose records carry a step and a clock; see HOURS_KEYS/SECONDS_KEYS)
    label    the point's name and its folder under OUT (default: the checkpoint folder's name)
    run      the curve it belongs to, e.g. "MosaicBERT-Base" vs "BERT-Base" (default: one curve)
    results  an existing results.json of `finetune-glue` to use instead of finetuning
Each checkpoint is finetuned into OUT/<label>/ with the finetune-glue options given here
(finished seeds are read back, interrupted ones resume). Writes OUT/pareto.png (error bars:
the standard error of the GLUE average over finetuning seeds, see report.py), pareto.json
and pareto.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..folders import check_destination, check_location
from ..outputs import atomic_write_bytes, atomic_write_json, atomic_write_text
from .finetune import finetune_glue
from .finetune_config import FinetuneConfig, add_finetune_options, load_finetune_config
from .models import trainer_state
from .runtime import Runtime, setup_runtime

STEP_KEYS = ("step", "global_step", "trainer/step", "train/step")
HOURS_KEYS = (
    "progress/train_hours",
    "hours",
    "wall_clock_hours",
    "time/hours",
    "time/wall_clock_hours",
    "time/elapsed_hours",
)
SECONDS_KEYS = (
    "train_seconds",
    "elapsed_s",
    "wall_clock_s",
    "time/elapsed_s",
    "time/wall_clock_s",
    "time/total_s",
    "seconds",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds pareto checkpoints.json --out runs/pareto            # finetune each, then plot\n"
        "    mosaicbert-ds pareto checkpoints.csv --out runs/pareto --metrics run/metrics.jsonl --seeds 3"
    )
    parser.add_argument("listing", type=Path, help="JSON or CSV: path, hours (or step), optional label/run/results")
    parser.add_argument("--out", type=Path, required=True, help="output folder, one subfolder per checkpoint")
    parser.add_argument("--metrics", type=Path, default=None, help="trainer metrics JSONL, for hours by step")
    parser.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="finetune checkpoints without results (--no-finetune: only read existing ones)",
    )
    parser.add_argument("--title", default=None, help="plot title")
    add_finetune_options(parser)


def _read_listing(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"listing {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = [
            {k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(io.StringIO(text))
        ]
        rows = [{k: v for k, v in row.items() if v != ""} for row in rows]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not JSON ({err.msg}); use .csv for CSV listings") from None
        rows = data.get("checkpoints") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: expected a list of objects (or {{'checkpoints': [...]}})")
    if not rows:
        raise UserError(f"{path}: no checkpoints listed")
    return rows


def _clock_records(path: Path) -> list[tuple[int, float]]:
    """(step, hours) from every JSONL record that has both a step and a clock."""
    if not path.is_file():
        raise UserError(f"--metrics {path} does not exist")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        step = next((rec[k] for k in STEP_KEYS if isinstance(rec.get(k), (int, float))), None)
        hours = next((rec[k] for k in HOURS_KEYS if isinstance(rec.get(k), (int, float))), None)
        if hours is None:
            secs = next((rec[k] for k in SECONDS_KEYS if isinstance(rec.get(k), (int, float))), None)
            hours = secs / 3600.0 if secs is not None else None
        if step is not None and hours is not None:
            records.append((int(step), float(hours)))
    if not records:
        raise UserError(
            f"--metrics {path}: no record has a step ({', '.join(STEP_KEYS)}) and a clock "
            f"({', '.join(HOURS_KEYS + SECONDS_KEYS)})"
        )
    return sorted(records)


def _number(value: Any, what: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {what} {value!r} is not a number") from None


def resolve_entries(listing: Path, metrics: Path | None) -> list[dict[str, Any]]:
    """Entries with absolute paths, hours and unique labels; every problem is a UserError here."""
    base = listing.resolve().parent
    clock = _clock_records(metrics) if metrics is not None else None
    entries, labels = [], set()
    for i, row in enumerate(_read_listing(listing)):
        where = f"{listing} entry {i + 1}"
        path = (base / row["path"]).resolve() if row.get("path") else None
        results = (base / row["results"]).resolve() if row.get("results") else None
        if path is None and results is None:
            raise UserError(f"{where}: needs 'path' (or 'results')")
        if results is not None and not results.is_file():
            raise UserError(f"{where}: results {results} does not exist")
        if results is None and not path.exists():
            raise UserError(f"{where}: checkpoint {path} does not exist")
        state = trainer_state(path)
        if row.get("hours") is not None:
            hours = _number(row["hours"], "hours", where)
        elif isinstance(state.get("train_seconds"), (int, float)) and row.get("step") is None:
            hours = state["train_seconds"] / 3600.0
        else:
            step = _number(row["step"], "step", where) if row.get("step") is not None else state.get("step")
            if step is None or clock is None:
                raise UserError(f"{where}: give 'hours', or a 'step' with --metrics")
            before = [h for s, h in clock if s <= step]
            if not before:
                raise UserError(f"{where}: --metrics has no clock at or before step {int(step)}")
            hours = before[-1]
        if hours < 0:
            raise UserError(f"{where}: hours must not be negative")
        label = str(row.get("label") or (path or results.parent).name)
        if not re.fullmatch(r"[\w.+-]+", label):
            raise UserError(f"{where}: label {label!r} must be letters, digits, '.', '+', '-' or '_'")
        if label in labels:
            raise UserError(f"{where}: label {label!r} is used twice; give each entry a 'label'")
        labels.add(label)
        entries.append(
            {
                "label": label,
                "run": str(row.get("run") or ""),
                "hours": hours,
                "path": str(path) if path else None,
                "results": str(results) if results else None,
            }
        )
    return entries


def _point(entry: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    avg = summary.get("glue_average")
    if not avg:
        raise UserError(f"{entry['label']}: its results have no GLUE average (no finished task)")
    return {**entry, "average": avg["mean"], "sem": avg["sem"], "complete": avg["complete"], "tasks": avg["tasks"]}


def plot(points: list[dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Average GLUE vs hours, one curve per run, error bars of one standard error."""
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot and no display needed

    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.subplots()
    runs = list(dict.fromkeys(p["run"] for p in points))
    for run in runs:
        pts = sorted((p for p in points if p["run"] == run), key=lambda p: p["hours"])
        ax.errorbar(
            [p["hours"] for p in pts],
            [p["average"] for p in pts],
            yerr=[p["sem"] for p in pts],
            marker="o",
            capsize=3,
            label=run or None,
        )
    complete = all(p["complete"] for p in points)
    n_tasks = max(len(p["tasks"]) for p in points)
    ax.set_xlabel("pretraining wall-clock hours")
    ax.set_ylabel("average GLUE (dev)" if complete else f"average over {n_tasks} GLUE tasks (dev)")
    ax.set_title(title or "GLUE average vs pretraining time")
    ax.grid(True, alpha=0.3)
    if any(runs):
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def to_markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| run | checkpoint | hours | GLUE average | s.e. | tasks |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["run"], p["hours"])):
        tasks = "all 8" if p["complete"] else ", ".join(p["tasks"])
        lines.append(
            f"| {p['run'] or '-'} | {p['label']} | {p['hours']:.3g} | {p['average']:.2f} | {p['sem']:.2f} | {tasks} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    entries = resolve_entries(args.listing, args.metrics)
    out = Path(args.out)
    check_location(out, "--out")  # before any finetuning: the same rules as finetune-glue --out
    check_destination(out, "glue")
    needs_training = args.finetune and any(not e["results"] for e in entries)
    # the finetuning settings every entry shares (model and out are each entry's own)
    settings = load_finetune_config(args.overrides, args) if needs_training else None
    rt = setup_runtime(settings.run.device) if settings else Runtime(torch.device("cpu"))
    try:
        points = [_point(e, _summary(e, out / e["label"], settings, rt)) for e in entries]
    finally:
        rt.close()
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        plot(points, out / "pareto.png", args.title)
        atomic_write_json(out / "pareto.json", {"points": points})
        atomic_write_text(out / "pareto.md", to_markdown(points))
        print(to_markdown(points))
        print(f"wrote {out / 'pareto.png'}, pareto.json and pareto.md", file=sys.stderr)
    return 0


def _summary(entry: dict[str, Any], folder: Path, settings: FinetuneConfig | None, rt: Runtime) -> dict[str, Any]:
    """The entry's results.json content: given, already in `folder`, or made by finetuning now
    (`settings`; None with --no-finetune)."""
    if entry["results"]:
        return json.loads(Path(entry["results"]).read_text(encoding="utf-8"))
    if settings is None:
        if not (folder / "results.json").is_file():
            raise UserError(f"{entry['label']}: no {folder / 'results.json'} (run without --no-finetune)")
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))
    if rt.is_main:
        print(f"== {entry['label']} ({entry['hours']:.3g} h): {entry['path']}", file=sys.stderr)
    cfg = dataclasses.replace(settings, model=entry["path"], out=str(folder))
    return finetune_glue(cfg, runtime=rt)["summary"]
