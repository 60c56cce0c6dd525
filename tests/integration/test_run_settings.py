"""One run per folder and no setting silently ignored: each case on the CPU with the tiny model,
checking the exit code, the one line, and that what was there before is intact."""

import signal
import subprocess
import time

import pytest

from mosaicbert_ds.train import checkpoint as ckpt
from tests.helpers.data import convert_docs, jargon_docs, tokenizer_dir
from tests.helpers.runs import (
    ROOT,
    cpu_env,
    last_line,
    metrics_rows,
    pretrain,
    pretrain_cmd,
    side_by_side,
    snapshot,
    tiny_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two datasets with the same tokenizer and different documents, and a third with another tokenizer."""
    tokenizer_dir(tmp_path_factory)
    base = tmp_path_factory.mktemp("ds")
    first = convert_docs(base, jargon_docs(1200)[:600], name="first", val_docs=32)
    second = convert_docs(base, jargon_docs(1200)[600:], name="second", val_docs=32)
    return first, second


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    """A 2-step run on the first dataset, its checkpoint complete."""
    run = tmp_path_factory.mktemp("runs") / "first"
    res = pretrain(*tiny_run(datasets[0], run, "duration.steps=2", "checkpoint.interval=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_a_fresh_start_over_another_runs_checkpoints_is_refused(datasets, finished_run, tmp_path):
    before = snapshot(finished_run)
    res = pretrain(*tiny_run(datasets[0], finished_run, "duration.steps=2", "checkpoint.resume=none"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last_line(res) == (
        f"mosaicbert-ds pretrain: error: output_dir {finished_run} holds another run's checkpoints (2 step "
        "folders, newest step_0000002) and a fresh start would overwrite them; resume it "
        "(checkpoint.resume=auto), choose another output_dir, or set overwrite_output_dir=true to delete them"
    )
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k != ".run.lock"} == {k: v for k, v in before.items() if k != ".run.lock"}

    auto = pretrain(*tiny_run(datasets[0], finished_run, "overwrite_output_dir=true"))
    assert auto.returncode == 2 and "with resume=auto, running the same command again would delete" in last_line(auto)

    # asked for: the earlier run's files go, a user's file stays
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(finished_run, copy)
    (copy / "NOTES.md").write_text("mine")
    fresh = pretrain(
        *tiny_run(datasets[0], copy, "duration.steps=1", "checkpoint.resume=none", "overwrite_output_dir=true")
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert ckpt.step_tags(copy / "checkpoints") == ["step_0000001"]
    assert [r["step"] for r in metrics_rows(copy)] == [1]  # a new log, not appended to the old one
    assert (copy / "NOTES.md").read_text() == "mine"


def test_resume_on_another_dataset_is_refused_unless_new_dataset(datasets, finished_run, tmp_path):
    first, second = datasets
    before = snapshot(finished_run)
    res = pretrain(*tiny_run(second, finished_run, "duration.steps=3"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last_line(res) == (
        f"mosaicbert-ds pretrain: error: checkpoint {finished_run / 'checkpoints' / 'step_0000002'} was trained on "
        f"another dataset than {second} (same tokenizer, another index); set data.new_dataset=true to continue "
        "on this one from its beginning"
    )
    assert snapshot(finished_run).keys() == before.keys()

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    ok = pretrain(*tiny_run(second, copy, "duration.steps=3", "data.new_dataset=true"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"data.new_dataset: {second} replaces the checkpoint's dataset; its data position starts" in ok.stderr
    assert (
        ckpt.read_trainer_state(copy / "checkpoints", "step_0000003")["dataset"]["index"]
        != (ckpt.read_trainer_state(copy / "checkpoints", "step_0000002")["dataset"]["index"])
    )


def test_deepspeed_config_values_decide_and_conflicts_are_refused(datasets, tmp_path):
    json_file = ROOT / "ds_configs" / "mosaicbert-base_1gpu.json"
    base = [f"deepspeed_config={json_file}", "precision=auto", "--dry-run"]
    conflicts = [
        (["optimizer.lr=1e-2"], f"optimizer.lr is 0.01 in the run, but {json_file} sets it to 0.0005"),
        (["batch.global_batch=64"], f"batch.global_batch is 64 in the run, but {json_file} sets it to 4096"),
        (["batch.micro_batch=16"], f"batch.micro_batch is 16 in the run, but {json_file} sets it to 256"),
        (["optimizer.weight_decay=1e-3"], "optimizer.weight_decay is 0.001 in the run, but"),
        (["precision=fp32"], f"precision is 'fp32' in the run, but {json_file} sets it to 'bf16'"),
    ]
    refused = side_by_side(  # refusals before any work, two at a time
        *(pretrain_cmd(*tiny_run(datasets[0], tmp_path / "run", *base, *extra)) for extra, _ in conflicts),
        at_once=2,
    )
    for (_, line), res in zip(conflicts, refused):
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert len(res.stderr.strip().splitlines()) == 1 and line in last_line(res), res.stderr
    # the same value as the JSON's (weight decay compared in the decoupled convention) is accepted
    import json

    from mosaicbert_ds.train.ds_config import build_ds_config

    small = tmp_path / "small.json"
    small.write_text(json.dumps(build_ds_config(global_batch=16, micro_batch=8, world_size=1, lr=5e-4, bf16=False)))
    agree = ["optimizer.lr=5e-4", "optimizer.weight_decay=1e-5", "batch.global_batch=16"]
    res = pretrain(*tiny_run(datasets[0], tmp_path / "run", f"deepspeed_config={small}", "--dry-run", *agree))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_run_config_json_records_the_values_that_run(datasets, tmp_path):
    import json

    from mosaicbert_ds.train.ds_config import build_ds_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(build_ds_config(global_batch=16, micro_batch=8, world_size=1, lr=2e-3, bf16=False)))
    run = tmp_path / "run"
    res = pretrain(*tiny_run(datasets[0], run, "duration.steps=1", f"deepspeed_config={ds}"))
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["batch"] == {"global_batch": 16, "micro_batch": 8, "micro_tokens": None, "global_tokens": None}
    assert recorded["optimizer"]["lr"] == 2e-3 and recorded["precision"] == "fp32"
    state = ckpt.read_trainer_state(run / "checkpoints", "step_0000001")
    assert state["global_batch"] == 16 and state["precision"] == "DeepSpeedZeroOptimizer"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_stop_after_must_be_positive(datasets, tmp_path, value):
    res = pretrain(*tiny_run(datasets[0], tmp_path / "run"), "--stop-after", value)
    assert res.returncode == 2 and last_line(res) == (
        f"mosaicbert-ds pretrain: error: --stop-after must be a positive number of steps, got {value}"
    )
    assert not (tmp_path / "run").exists()


def test_a_precision_change_on_resume_is_refused_before_the_engine(datasets, finished_run):
    res = pretrain(*tiny_run(datasets[0], finished_run, "duration.steps=3", "precision=bf16"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last_line(res) == (
        f"mosaicbert-ds pretrain: error: checkpoint {finished_run / 'checkpoints' / 'step_0000002'} was saved by "
        "DeepSpeed's DeepSpeedZeroOptimizer, but this run would load it into BF16_Optimizer; keep the "
        "checkpoint's precision and ZeRO settings (precision, optimizer.zero_stage)"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_while_the_run_starts_stops_it_cleanly(datasets, tmp_path, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        pretrain_cmd(*tiny_run(datasets[0], run, "duration.steps=5")),
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # still importing: before any handler of the old code, and long before the first step
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 4, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"mosaicbert-ds pretrain: stopped before step 1 ({signal.Signals(signum).name}); nothing to save yet: "
        "run the same command to start"
    )
    assert "Traceback" not in err and not ckpt.step_tags(run / "checkpoints")
