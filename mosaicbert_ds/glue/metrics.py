"""GLUE metrics in numpy: accuracy, binary F1, Matthews correlation, Pearson and Spearman.

They follow the definitions GLUE's evaluation uses (scikit-learn / scipy semantics), written
here so that the project needs neither library:
  - F1 is binary with class 1 as positive; 0 when there is no true and no predicted positive.
  - Matthews correlation is the multi-class form (Gorodkin's R_K); 0 when it is undefined
    (all predictions, or all labels, in one class).
  - Spearman is Pearson on ranks, tied values getting the average of their ranks.
  - Pearson of a constant vector is undefined; it is reported as 0 (no linear relation).
Functions return fractions; `task_metrics` returns GLUE's percent scale.
"""

from __future__ import annotations

import numpy as np

from .tasks import Task


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float(np.mean(preds == labels)) if labels.size else 0.0


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1: 2 TP / (2 TP + FP + FN)."""
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp = np.sum(preds & labels)
    denom = 2 * tp + np.sum(preds & ~labels) + np.sum(~preds & labels)
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) over the confusion
    matrix: c correct, s total, p_k predicted and t_k true counts of class k."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, inverse = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    t_idx, p_idx = inverse[: labels.size], inverse[labels.size :]
    k = classes.size
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (t_idx, p_idx), 1.0)
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; a group of tied values shares the mean of the ranks it spans."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the highest rank each distinct value reaches
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


_FUNCTIONS = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def predictions(task: Task, logits: np.ndarray) -> np.ndarray:
    """Class ids from (N, C) logits, or the (N,) scores of a regression head."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if task.regression else logits.argmax(axis=-1)


def task_metrics(task: Task, suffix: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics on one dev split, in percent, keyed like Task.metric_keys()."""
    return {(f"{m}_{suffix}" if suffix else m): 100.0 * _FUNCTIONS[m](preds, labels) for m in task.metrics}
