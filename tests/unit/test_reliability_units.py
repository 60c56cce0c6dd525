"""Single-process pieces of the trainer's failure handling: non-finite logging, the device-side
divergence counters, durations, the schedule on resume, and folders that are never deleted."""

import json
import math

import pytest
import torch

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.health import MAX_STREAK, STREAK, STREAK_START, Health, describe_divergence
from mosaicbert_ds.train.metrics import MetricsLogger
from mosaicbert_ds.train.schedule import WarmupLinearDecay, make_scheduler, retarget_schedule
from mosaicbert_ds.train.stops import parse_duration


def test_nonfinite_metrics_are_logged_as_what_they_are(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log(1, {"loss/train": float("nan"), "optim/grad_norm": float("inf"), "optim/lr": 1e-3, "x": None})
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON: no NaN literal
    assert row == {
        "step": 1,
        "loss/train": None,
        "optim/grad_norm": None,
        "optim/lr": 1e-3,
        "nonfinite": ["loss/train", "optim/grad_norm"],
    }
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert math.isnan(events.Scalars("loss/train")[0].value)
    assert math.isinf(events.Scalars("optim/grad_norm")[0].value)


def test_health_counts_consecutive_nonfinite_steps_on_the_device():
    health = Health(torch.device("cpu"))
    nan, ok = torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    for step, loss in enumerate([ok, nan, nan, ok, nan, nan, nan], start=1):
        health.update(step, loss, torch.tensor(1.0))
    row = health.row().tolist()
    assert row[MAX_STREAK] == 3 and row[STREAK] == 3 and row[STREAK_START] == 5 and row[0] == 5
    other = Health(torch.device("cpu"))  # a rank whose loss stayed finite; its gradient norm did not
    for step in range(1, 8):
        other.update(step, ok, torch.tensor(float("inf")) if step >= 5 else torch.tensor(1.0))
    first, where = describe_divergence([row, other.row().tolist()], 3)
    assert first == 5 and where == "non-finite loss first on rank(s) 0 at step 5"
    health.reset_interval()
    assert health.row().tolist()[0] == 0 and health.row().tolist()[MAX_STREAK] == 3  # the streak goes on


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("120", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_wall_time_is_one_line():
    from mosaicbert_ds.train.run_config import load_run_config

    with pytest.raises(UserError, match="duration.wall_time: not a duration like 3h50m"):
        load_run_config("tiny-cpu", ["data.path=x", "duration.wall_time=soon"])


def test_a_longer_duration_on_resume_recomputes_the_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make_scheduler(4, 0.25, 0.1)(opt)
    for _ in range(4):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    opt2 = torch.optim.SGD([param], lr=1.0)
    resumed = make_scheduler(8, 0.25, 0.1)(opt2)
    resumed.load_state_dict(saved)
    assert resumed.lr_lambdas[0].total_steps == 4  # what LambdaLR restores: the old total
    assert retarget_schedule(resumed, 8, 0.25, 0.1) == 4
    assert opt2.param_groups[0]["lr"] == pytest.approx(WarmupLinearDecay(8, 0.25, 0.1)(4))
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(WarmupLinearDecay(8, 0.25, 0.1)(5))


def test_quickstart_replaces_only_its_own_run_folder(tmp_path):
    from mosaicbert_ds.outputs import MARKER
    from mosaicbert_ds.quickstart import start_over

    mine = tmp_path / "pretrain"
    start_over(mine)
    (mine / "metrics.jsonl").write_text("{}\n")
    start_over(mine)  # an earlier quickstart run: replaced
    assert sorted(p.name for p in mine.iterdir()) == [MARKER]
    users = tmp_path / "users" / "pretrain"
    users.mkdir(parents=True)
    (users / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="is not a quickstart run folder"):
        start_over(users)
    assert (users / "thesis.tex").read_text() == "mine"


def test_glue_model_folder_never_replaces_a_foreign_folder(tmp_path):
    from mosaicbert_ds.glue.trainer import MODEL_KIND
    from mosaicbert_ds.outputs import output_folder

    target = tmp_path / "mnli_model"
    with output_folder(target, MODEL_KIND) as tmp:
        (tmp / "config.json").write_text("{}")
    with output_folder(target, MODEL_KIND) as tmp:  # our own: replaced
        (tmp / "config.json").write_text('{"v": 2}')
    assert json.loads((target / "config.json").read_text()) == {"v": 2}
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    with pytest.raises(UserError, match="refusing to replace"):
        with output_folder(foreign, MODEL_KIND) as tmp:
            (tmp / "config.json").write_text("{}")
    assert (foreign / "a.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnli_model", "notes"]  # no temporary folder left
