"""Single-process pieces of the trainer's failure handling: non-finite logging, the device-side
divergence counters, durations, the schedule on resume, and folders that are never deleted."""

import json
import math
import re

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


def test_resume_checks_every_weight_shape_and_a_readable_model_config(tmp_path):
    from mosaicbert_ds import MosaicBertConfig
    from mosaicbert_ds.train.checkpoint import check_model_matches

    root = tmp_path / "checkpoints"
    (root / "step_0000004").mkdir(parents=True)
    saved = MosaicBertConfig.from_name("tiny", vocab_size=2048, position_embedding_type="learned")
    saved.to_json_file(root / "model_config.json")
    check_model_matches(root, saved.to_dict())  # the same model: fine
    longer = MosaicBertConfig.from_name(
        "tiny", vocab_size=2048, position_embedding_type="learned", max_position_embeddings=1024
    )
    with pytest.raises(UserError, match=r"position_embeddings.weight: checkpoint \(512, 64\) vs run \(1024, 64\)"):
        check_model_matches(root, longer.to_dict())  # would be a size-mismatch RuntimeError in load_checkpoint
    alibi = MosaicBertConfig.from_name("tiny", vocab_size=2048)
    alibi.to_json_file(root / "model_config.json")
    check_model_matches(root, alibi.to_dict() | {"max_position_embeddings": 1024})  # no weight changes: fine
    saved.to_json_file(root / "model_config.json")
    other = saved.to_dict() | {"pad_vocab_size_multiple": 64, "vocab_size": 2049}
    with pytest.raises(UserError, match="vocab_size: checkpoint 2048 vs run 2049"):
        check_model_matches(root, other)
    text = (root / "model_config.json").read_text()
    (root / "model_config.json").write_text(text[:40])
    with pytest.raises(UserError, match=r"model_config.json is not readable JSON \(.*\); restore it"):
        check_model_matches(root, saved.to_dict())
    (root / "model_config.json").unlink()
    with pytest.raises(UserError, match=f"checkpoint folder {root} has no model_config.json"):
        check_model_matches(root, saved.to_dict())
    check_model_matches(tmp_path / "fresh", saved.to_dict())  # no checkpoints at all: nothing to match


def test_a_tag_is_a_name_inside_the_checkpoint_folder(tmp_path):
    from mosaicbert_ds.train.checkpoint import resolve_tag

    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    for tag in ("../../../../../etc", "/etc", "..", ".", "step_0000001/../step_0000001"):
        with pytest.raises(UserError, match=f"checkpoint tag {re.escape(repr(tag))} is not the name of a folder in"):
            resolve_tag(tmp_path / "checkpoints", tag)
    with pytest.raises(UserError, match="step_0000001 is not complete: no complete.json"):
        resolve_tag(tmp_path / "checkpoints", "step_0000001")


def test_quickstart_keeps_a_run_folder_holding_the_users_files(tmp_path):
    from mosaicbert_ds.quickstart import start_over

    run = tmp_path / "pretrain"
    start_over(run)
    for name in ("metrics.jsonl", "run_config.json"):
        (run / name).write_text("{}\n")
    (run / "checkpoints").mkdir()
    (run / "NOTES.md").write_text("what I tried")
    with pytest.raises(UserError, match="it holds NOTES.md, which the quickstart did not write"):
        start_over(run)
    assert (run / "NOTES.md").read_text() == "what I tried" and (run / "metrics.jsonl").is_file()
    (run / "NOTES.md").unlink()
    start_over(run)  # only what a run writes: replaced
    assert [p.name for p in run.iterdir()] == [".mosaicbert-ds-output.json"]
