"""finetune-glue's settings: the flags and `key=value` overrides make the same FinetuneConfig, and
a mistake in either is one line (exit 2) before anything is read or written."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mosaicbert_ds import cli
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.glue import finetune
from mosaicbert_ds.glue.finetune_config import FinetuneConfig, load_finetune_config
from mosaicbert_ds.glue.tasks import TASKS


def from_command_line(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # as cli.main parses them
    return load_finetune_config(args.overrides, args, model=args.model, out=args.out)


def test_flags_and_key_value_settings_are_the_same_run():
    flags = from_command_line(
        ["m", "--out", "o", "--tasks", "rte,mrpc", "--seeds", "3,rte=2", "--first-seed", "7", "--no-mnli-start"]
        + ["--data-dir", "glue", "--limit-train", "200", "--limit-eval", "50", "--tokenizer", "tok"]
        + ["--hparam", "epochs=1", "--hparam", "rte.lr=2e-5", "--save-every", "0", "--eval-batch-size", "64"]
        + ["--device", "cpu", "--no-progress"]
    )
    settings = from_command_line(
        ["m", "--out", "o", "tasks.names=rte,mrpc", "tasks.seeds=3,rte=2", "tasks.first_seed=7"]
        + ["tasks.mnli_start=false", "data.dir=glue", "data.limit_train=200", "data.limit_eval=50", "tokenizer=tok"]
        + ["hparams.epochs=1", "hparams.rte.lr=2e-5", "run.save_every=0", "run.eval_batch_size=64"]
        + ["run.device=cpu", "run.progress=false"]
    )
    assert flags.recipe() == settings.recipe()
    flags.hparams = settings.hparams = {}  # the flags keep --hparam's text, the overrides read numbers
    assert flags == settings
    assert [t.name for t in settings.task_list()] == ["rte", "mrpc"]
    assert settings.seed_counts() == {"rte": 2, "mrpc": 3}


def test_defaults_are_the_papers_recipe_and_a_tasks_own_value_wins():
    cfg = from_command_line(["m", "--out", "o"])
    assert cfg.recipe() == {name: task.hparams for name, task in TASKS.items()}
    assert [t.name for t in cfg.task_list()] == list(TASKS) and cfg.seed_counts()["rte"] == 5
    assert [t.name for t in from_command_line(["m", "--out", "o", "--tasks", "stsb"]).task_list()] == ["mnli", "stsb"]
    hp = from_command_line(["m", "--out", "o", "--hparam", "rte.lr=2e-5", "hparams.lr=1e-3", "tasks.seeds=2"]).recipe()
    assert hp["rte"].lr == 2e-5 and hp["mrpc"].lr == 1e-3 and hp["rte"].epochs == TASKS["rte"].hparams.epochs


@pytest.mark.parametrize(
    "args, message",
    [
        (["tasks.nmes=rte"], "unknown key(s) tasks.nmes (known: first_seed, mnli_start, names, seeds)"),
        (["run.save_every=soon"], "run.save_every must be an integer, got 'soon'"),
        (["--save-every", "-1"], "run.save_every (--save-every) must be >= 0, got -1"),
        (["data.limit_train=0"], "data.limit_train (--limit-train) must be positive, got 0"),
        (["--hparam", "lr"], "--hparam 'lr': expected KEY=VALUE or TASK.KEY=VALUE"),
        (["hparams.lr=-1"], "hyperparameter lr=-1.0 is out of range"),
        (["hparams.wnli.lr=1e-5"], "unknown GLUE task 'wnli'"),
        (["tasks.seeds=rte=0"], "--seeds: 'rte=0' must be at least 1"),
        (["run.device=tpu"], "run.device must be auto, cpu or cuda, got 'tpu'"),
        (["tasks.mnli_start"], "override 'tasks.mnli_start' is not of the form key=value"),
        (
            ["--cuda-graphs", "--device", "cpu"],
            "run.cuda_graphs=true (--cuda-graphs) needs a CUDA device, not run.device=cpu",
        ),
        (
            ["run.cuda_graphs=true", "run.device=cpu"],
            "run.cuda_graphs=true (--cuda-graphs) needs a CUDA device, not run.device=cpu",
        ),
        (["run.cuda_graphs=maybe"], "run.cuda_graphs must be"),
    ],
)
def test_a_bad_setting_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path: Path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["finetune-glue", str(tmp_path / "no-model"), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"mosaicbert-ds finetune-glue: error: {message}"), err
    assert not out.exists()
    with pytest.raises(UserError, match="does not exist"):  # the settings alone are fine without the mistake
        finetune.finetune_glue(load_finetune_config(model=str(tmp_path / "no-model"), out=str(out)))
