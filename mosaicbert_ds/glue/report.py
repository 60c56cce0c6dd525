"""Per-task means and spreads over seeds, the GLUE average, and the results.md / results.json tables.

GLUE average (our convention, the usual one-metric-per-task form): the mean over the eight
tasks of MNLI-m accuracy, QNLI accuracy, QQP F1, SST-2 accuracy, CoLA Matthews correlation,
RTE accuracy, MRPC F1 and STS-B Spearman, each first averaged over that task's seeds
(Task.score_metric names the metric). All scores are in percent.

Spread: per task, the sample standard deviation over seeds (ddof 1) and the standard error
of the mean; for the average, its standard error sqrt(sum_t sem_t^2) / n_tasks, which treats
tasks as independent and counts a single-seed task as having no seed spread (its sem is
unknown, shown as none). The average is marked complete only when all eight tasks are present.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .tasks import TASKS, Task


def _spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {
        "mean": float(arr.mean()),
        "std": std,
        "sem": std / math.sqrt(arr.size) if std is not None else None,
        "n": int(arr.size),
        "values": [float(v) for v in arr],
    }


def summarize_task(task: Task, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread of each metric over the seeds' result dicts."""
    metrics = {key: _spread([r["metrics"][key] for r in results]) for key in task.metric_keys()}
    seconds = [r.get("seconds") for r in results]
    return {
        "display": task.display,
        "seeds": [r["seed"] for r in results],
        "metrics": metrics,
        "score_metric": task.score_metric,
        "score": metrics[task.score_metric],
        "finetune_seconds": sum(seconds) if all(isinstance(x, (int, float)) for x in seconds) else None,
        "tokens_per_sec": _mean_of(r.get("tokens_per_sec") for r in results),
        "mfu": _mean_of(r.get("mfu") for r in results),
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _mean_of(values: Any) -> float | None:
    """The mean of the numbers among `values` (None without any)."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def glue_average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The average of the tasks' scores (see the module docstring), or None without tasks."""
    if not tasks:
        return None
    scores = [t["score"] for t in tasks.values()]
    sems = [s["sem"] or 0.0 for s in scores]
    return {
        "mean": float(np.mean([s["mean"] for s in scores])),
        "sem": math.sqrt(sum(e * e for e in sems)) / len(scores),
        "tasks": list(tasks),
        "complete": set(tasks) == set(TASKS),
        "metrics": {name: t["score_metric"] for name, t in tasks.items()},
    }


def summarize(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results.json document: meta, per-task summaries in run order, the GLUE average."""
    tasks = {name: summarize_task(TASKS[name], results[name]) for name in TASKS if results.get(name)}
    return {"meta": meta or {}, "scale": "percent", "tasks": tasks, "glue_average": glue_average(tasks)}


def _fmt(stat: dict[str, Any]) -> str:
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["std"] is not None else "")


_METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


def _metric_label(key: str) -> str:
    base, _, suffix = key.partition("_")
    return _METRIC_NAMES[base] + (f"-{suffix}" if suffix else "")


def to_markdown(summary: dict[str, Any]) -> str:
    """A results table: one row per task (mean ± std over seeds), then the GLUE average."""
    lines = ["# GLUE (dev) results", ""]
    meta = summary.get("meta") or {}
    if meta.get("model"):
        lines += [f"Model: `{meta['model']}`", ""]
    if meta.get("pretrain_seconds") is not None:
        lines += [
            f"Pretraining: {meta['pretrain_seconds']:.0f} s ({meta['pretrain_seconds'] / 3600:.3f} h) of training",
            "",
        ]
    lines += [
        "| task | metrics (mean ± std over seeds) | score in average | seeds | finetune s | tokens/s | MFU |",
        "|------|--------------------------------|------------------|-------|------------|----------|-----|",
    ]
    for task in summary["tasks"].values():
        metrics = ", ".join(f"{_metric_label(k)} {_fmt(v)}" for k, v in task["metrics"].items())
        score = f"{_metric_label(task['score_metric'])} {task['score']['mean']:.2f}"
        ft = task.get("finetune_seconds")
        lines.append(
            f"| {task['display']} | {metrics} | {score} | {len(task['seeds'])} | "
            f"{'-' if ft is None else format(ft, '.1f')} | {_rate(task.get('tokens_per_sec'))} | "
            f"{'-' if task.get('mfu') is None else format(task['mfu'], '.1%')} |"
        )
    avg = summary["glue_average"]
    if avg is not None:
        label = "GLUE average" if avg["complete"] else f"partial average ({len(avg['tasks'])} of {len(TASKS)} tasks)"
        total = [t.get("finetune_seconds") for t in summary["tasks"].values()]
        ft = f"{sum(total):.1f}" if all(x is not None for x in total) else "-"
        lines.append(f"| **{label}** | | **{avg['mean']:.2f}** ± {avg['sem']:.2f} (s.e.) | | {ft} | | |")
    lines += [
        "",
        "Average: MNLI-m acc, QNLI acc, QQP F1, SST-2 acc, CoLA MCC, RTE acc, MRPC F1, STS-B Spearman; "
        "± after the average is its standard error over finetuning seeds. tokens/s: real (non-pad) "
        "training tokens per second of the finetuning loop, all ranks; MFU: 6 x parameters x tokens/s over "
        "the GPUs' bf16 peak (the paper's Appendix H formula, '-' where the peak is not known).",
    ]
    return "\n".join(lines) + "\n"
