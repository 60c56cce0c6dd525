"""The plateau warning in real runs: a stuck tiny BERT warns once, a learning tiny MosaicBERT does not.

Both runs are the same but for the architecture (4 layers, width 128, peak rate 3e-3 after a
3-step warmup, batch 32, the quickstart's dataset): measured in docs/convergence.md, the
BERT-style model stays at the unigram level for hundreds of steps, the MosaicBERT-style model is
0.2 nats below it by step 100. Evaluation at steps 50 and 100, warning due from step 53
(warmup + eval.plateau_steps).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.plateau_probe import MODELS
from tests.helpers.runs import metrics_rows, pretrain_cmd, side_by_side

pytestmark = pytest.mark.slow
WARNING = "mosaicbert-ds: warning: the held-out loss has not gone below the unigram level after 100 steps"


def probe(model: str, data: Path, out: Path) -> list[str]:
    """The pretrain command of the probe `model` (benchmarks/plateau_probe.py) on `data`."""
    recipe, *overrides = MODELS[model]
    return pretrain_cmd(
        recipe,
        *overrides,
        f"data.path={data}",
        f"output_dir={out}",
        "data.num_workers=0",
        "batch.global_batch=32",
        "batch.micro_batch=32",
        "optimizer.lr=3e-3",
        "schedule.warmup_fraction=0",
        "schedule.min_warmup_steps=3",
        "duration.steps=100",
        "eval.interval=50",
        "eval.batches=0",
        "eval.plateau_steps=50",
        "checkpoint.interval=0",
        "log.interval=50",
        "log.progress_bar=false",
        "log.tensorboard=false",
        "precision=fp32",
    )


@pytest.fixture(scope="module")
def runs(jargon_data_2048: Path, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Both probes, trained at the same time (they are independent): {model: (run folder, result)}."""
    tmp = tmp_path_factory.mktemp("plateau")
    models = {"bert-tiny": tmp / "stuck", "mosaic-tiny": tmp / "learns"}
    done = side_by_side(*(probe(model, jargon_data_2048, out) for model, out in models.items()), timeout=1800)
    return {model: (out, res) for (model, out), res in zip(models.items(), done)}


def evals(out: Path) -> list[dict]:
    return [r for r in metrics_rows(out) if "loss/eval" in r]


def test_a_stuck_run_warns_once_and_goes_on(runs, jargon_data_2048: Path) -> None:
    out, done = runs["bert-tiny"]
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "warning: the held-out loss" in line]
    assert len(warnings) == 1 and warnings[0].startswith(WARNING), done.stderr[-3000:]
    assert "raise schedule.min_warmup_steps or lower optimizer.lr" in warnings[0]
    assert "warmup 3 steps, peak lr 0.003" in warnings[0]
    level = json.loads((jargon_data_2048 / "mosaicbert_index.json").read_text())["unigram_val_loss"]
    points = evals(out)
    assert [r["step"] for r in points] == [50, 100]  # the run went on to its end
    assert all(r["loss/unigram_baseline"] == level for r in points)
    assert points[-1]["loss/eval"] > level - 0.1


def test_a_learning_run_does_not_warn(runs) -> None:
    out, done = runs["mosaic-tiny"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: the held-out loss" not in done.stderr
    points = evals(out)
    assert points[-1]["loss/eval"] < points[-1]["loss/unigram_baseline"] - 0.1
