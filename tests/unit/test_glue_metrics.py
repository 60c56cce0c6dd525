"""GLUE metrics against hand-computed values, and the per-task / average report built from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mosaicbert_ds.glue import metrics as M
from mosaicbert_ds.glue.report import glue_average, summarize, to_markdown
from mosaicbert_ds.glue.tasks import TASKS

# preds vs labels: TP at 0 and 3, FP at 1, FN at 4, TN at 2 and 5
PREDS = np.array([1, 1, 0, 1, 0, 0])
LABELS = np.array([1, 0, 0, 1, 1, 0])


def test_accuracy_and_f1_by_hand() -> None:
    assert M.accuracy(PREDS, LABELS) == pytest.approx(4 / 6)
    assert M.f1_binary(PREDS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_f1_without_positives_is_zero_and_uses_class_one() -> None:
    assert M.f1_binary(np.zeros(4, int), np.zeros(4, int)) == 0.0
    # class 0 right everywhere, class 1 never predicted: F1 of class 1 is 0, not 0.8
    assert M.f1_binary(np.array([0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 1])) == 0.0


def test_matthews_binary_by_hand() -> None:
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3^4)
    assert M.matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 3)
    assert M.matthews_corrcoef(LABELS, LABELS) == pytest.approx(1.0)
    assert M.matthews_corrcoef(1 - LABELS, LABELS) == pytest.approx(-1.0)


def test_matthews_multiclass_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    # c = 4 correct of s = 6; true counts t = (2, 2, 2), predicted counts p = (2, 3, 1)
    expected = (4 * 6 - (2 * 2 + 3 * 2 + 1 * 2)) / math.sqrt((36 - (4 + 9 + 1)) * (36 - 12))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(expected)


def test_matthews_degenerate_is_zero() -> None:
    assert M.matthews_corrcoef(np.ones(6, int), LABELS) == 0.0  # one predicted class
    assert M.matthews_corrcoef(PREDS, np.zeros(6, int)) == 0.0  # one true class


def test_pearson_by_hand() -> None:
    # dx = (-1, 0, 1), dy = (-7/3, -1/3, 8/3): r = 5 / sqrt(2 * 114/9)
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([2, 2, 2], [1, 2, 3]) == 0.0


def test_average_ranks_share_ties() -> None:
    np.testing.assert_allclose(M.average_ranks(np.array([10, 20, 10, 30, 20, 20])), [1.5, 4, 1.5, 6, 4, 4])


def test_spearman_with_ties_by_hand() -> None:
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone but not linear: Spearman 1, Pearson below 1
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert M.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert M.pearson(x, np.exp(x)) < 0.99


def test_task_metrics_in_percent_with_split_suffix() -> None:
    mrpc = M.task_metrics(TASKS["mrpc"], "", PREDS, LABELS)
    assert mrpc == pytest.approx({"f1": 100 * 2 / 3, "accuracy": 100 * 4 / 6})
    assert list(M.task_metrics(TASKS["mnli"], "mm", PREDS, LABELS)) == ["accuracy_mm"]
    assert TASKS["mnli"].metric_keys() == ["accuracy_m", "accuracy_mm"]
    np.testing.assert_array_equal(M.predictions(TASKS["mnli"], np.array([[0.1, 2.0, 0.3]])), [1])
    np.testing.assert_allclose(M.predictions(TASKS["stsb"], np.array([[3.5], [1.0]])), [3.5, 1.0])


def _result(task: str, seed: int, **metrics: float) -> dict:
    return {"task": task, "seed": seed, "metrics": metrics}


def test_report_spread_and_average() -> None:
    results = {
        "rte": [_result("rte", 1, accuracy=60.0), _result("rte", 2, accuracy=70.0)],
        "stsb": [_result("stsb", 1, pearson=80.0, spearman=78.0)],
    }
    summary = summarize(results)
    rte = summary["tasks"]["rte"]["score"]
    assert rte["mean"] == pytest.approx(65.0)
    assert rte["std"] == pytest.approx(math.sqrt(50.0))  # sample std (ddof 1)
    assert rte["sem"] == pytest.approx(5.0)
    assert summary["tasks"]["stsb"]["score"]["std"] is None  # one seed: no spread
    avg = summary["glue_average"]
    assert avg["mean"] == pytest.approx((65.0 + 78.0) / 2)  # STS-B enters with Spearman
    assert avg["sem"] == pytest.approx(5.0 / 2)
    assert not avg["complete"]
    md = to_markdown(summary)
    assert "| RTE | acc 65.00 ± 7.07 |" in md and "partial average (2 of 8 tasks)" in md


def test_average_complete_with_all_tasks() -> None:
    tasks = {name: {"score": {"mean": 50.0, "sem": None}, "score_metric": t.score_metric} for name, t in TASKS.items()}
    avg = glue_average(tasks)
    assert avg["complete"] and avg["mean"] == 50.0 and avg["sem"] == 0.0
    assert avg["metrics"] == {
        "mnli": "accuracy_m",
        "qnli": "accuracy",
        "qqp": "f1",
        "sst2": "accuracy",
        "cola": "mcc",
        "rte": "accuracy",
        "mrpc": "f1",
        "stsb": "spearman",
    }
