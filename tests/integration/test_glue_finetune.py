"""finetune-glue on the tiny fixtures: learning, the staged MNLI start, heads, resume, inputs, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mosaicbert_ds import cli
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.glue.data import load_split, tokenize
from mosaicbert_ds.glue.finetune import finetune_glue
from mosaicbert_ds.glue.finetune_config import load_finetune_config
from mosaicbert_ds.glue.models import load_for_task, uses_packed_batches
from mosaicbert_ds.glue.tasks import TASKS
from mosaicbert_ds.glue.trainer import Hooks
from mosaicbert_ds.train.schedule import WarmupLinearDecay
from tests.helpers.glue import TSV, make_bert_model, make_mosaic_model, make_trainer_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mosaic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mosaic_model(tmp_path_factory.mktemp("mosaic"))


def ft(model: Path, out: Path, *overrides: str, hooks: Hooks | None = None) -> dict:
    """finetune-glue on the fixture files, on the CPU, with `key=value` settings."""
    cfg = load_finetune_config(
        [f"data.dir={TSV}", "run.device=cpu", "run.progress=false", *overrides], model=str(model), out=str(out)
    )
    return finetune_glue(cfg, hooks=hooks)["summary"]


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    lr_factor = WarmupLinearDecay(100, 0.06, 0.0, floor_after_last_step=True)  # the finetuning schedule
    factors = [lr_factor(s) for s in range(100)]
    assert factors[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert factors[6] == pytest.approx(94 / 94) and factors[-1] == pytest.approx(1 / 94)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert lr_factor(100) == 0.0


def test_tiny_model_learns_the_keyword_rule(mosaic_dir: Path, tmp_path: Path) -> None:
    summary = ft(
        mosaic_dir,
        tmp_path / "o",
        "tasks.names=sst2",
        "tasks.seeds=1",
        "hparams.lr=1e-3",
        "hparams.weight_decay=0",
        "hparams.epochs=15",
    )
    assert summary["tasks"]["sst2"]["score"]["mean"] >= 85.0  # chance is 50


def test_staged_tasks_start_from_the_mnli_model(mosaic_dir: Path, tmp_path: Path) -> None:
    loaded: dict[str, tuple[dict, object]] = {}

    def on_loaded(task, seed, model) -> None:
        loaded[task.name] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config)

    out = tmp_path / "o"
    summary = ft(
        mosaic_dir,
        out,
        "tasks.names=rte,stsb",
        "tasks.seeds=1",
        "hparams.epochs=2",
        "hparams.lr=1e-3",
        hooks=Hooks(on_model_loaded=on_loaded),
    )
    assert list(summary["tasks"]) == ["mnli", "rte", "stsb"]  # MNLI added and run first
    pretrained = load_file(str(mosaic_dir / "model.safetensors"))
    mnli = load_file(str(out / "mnli" / "seed42" / "model" / "model.safetensors"))
    shared = [k for k in pretrained if k.startswith("bert.") and k in mnli]
    assert len(shared) > 10
    for k in shared:  # MNLI itself starts from the pretrained encoder
        assert torch.equal(loaded["mnli"][0][k], pretrained[k]), k
    for name in ("rte", "stsb"):
        state = loaded[name][0]
        encoder = [k for k in state if k.startswith("bert.")]
        assert "bert.pooler.weight" in encoder
        for k in encoder:
            assert torch.equal(state[k], mnli[k]), (name, k)
        assert any(not torch.equal(mnli[k], pretrained[k]) for k in shared)  # MNLI did train
    # the head is re-initialised where the label count differs
    assert loaded["mnli"][0]["classifier.weight"].shape == (3, 64)
    assert loaded["rte"][0]["classifier.weight"].shape == (2, 64)
    assert loaded["stsb"][0]["classifier.weight"].shape == (1, 64)
    assert loaded["stsb"][1].problem_type == "regression"
    assert loaded["rte"][1].problem_type == "single_label_classification"


def test_without_mnli_start_staged_tasks_use_the_pretrained_model(mosaic_dir: Path, tmp_path: Path) -> None:
    loaded = {}
    hooks = Hooks(
        on_model_loaded=lambda task, seed, model: loaded.update(
            {k: v.detach().clone() for k, v in model.state_dict().items()}
        )
    )
    summary = ft(
        mosaic_dir,
        tmp_path / "o",
        "tasks.names=mrpc",
        "tasks.seeds=1",
        "tasks.mnli_start=false",
        "hparams.epochs=1",
        hooks=hooks,
    )
    assert list(summary["tasks"]) == ["mrpc"]
    pretrained = load_file(str(mosaic_dir / "model.safetensors"))
    assert torch.equal(
        loaded["bert.embeddings.word_embeddings.weight"], pretrained["bert.embeddings.word_embeddings.weight"]
    )


@pytest.mark.parametrize("name", ["stsb", "rte", "mnli"])
def test_regression_and_classification_heads(mosaic_dir: Path, name: str) -> None:
    task = TASKS[name]
    model = load_for_task(mosaic_dir, task).eval()
    tok = AutoTokenizer.from_pretrained(str(mosaic_dir))
    batch = tokenize(tok, load_split(task, "train", TSV), 256).batch(np.arange(8), packed=True)
    out = model(**batch)
    assert out.logits.shape == (8, task.num_labels)
    if task.regression:
        expected = F.mse_loss(out.logits.squeeze(-1), batch["labels"])
        assert batch["labels"].dtype == torch.float32
    else:
        expected = F.cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, expected)


class Interrupt(Exception):
    pass


def test_interrupted_task_resumes_where_it_stopped(mosaic_dir: Path, tmp_path: Path) -> None:
    kw = ["tasks.names=sst2", "tasks.seeds=1", "hparams.epochs=2", "hparams.lr=1e-3", "run.save_every=2"]
    ft(mosaic_dir, tmp_path / "ref", *kw)  # 3 steps an epoch

    def stop(task, seed, step) -> None:
        if step == 3:
            raise Interrupt

    out = tmp_path / "run"
    seed_dir = out / "sst2" / "seed42"
    with pytest.raises(Interrupt):
        ft(mosaic_dir, out, *kw, hooks=Hooks(on_step=stop))
    assert not (seed_dir / "result.json").exists() and not (out / "results.json").exists()
    assert torch.load(seed_dir / "state.pt", weights_only=False)["step"] == 2

    steps: list[int] = []
    record = Hooks(on_step=lambda task, seed, step: steps.append(step))
    ft(mosaic_dir, out, *kw, hooks=record)
    assert steps == [3, 4, 5, 6]  # continued after the saved step 2, did not restart
    result = json.loads((seed_dir / "result.json").read_text())
    reference = json.loads((tmp_path / "ref" / "sst2" / "seed42" / "result.json").read_text())
    assert result["resumed_from_step"] == 2 and reference["resumed_from_step"] is None
    assert not (seed_dir / "state.pt").exists()
    # same weights, optimizer moments, schedule and dropout RNG as the uninterrupted run
    assert result["eval_loss"]["validation"] == pytest.approx(reference["eval_loss"]["validation"], rel=1e-5)
    assert result["metrics"] == pytest.approx(reference["metrics"])

    steps.clear()
    ft(mosaic_dir, out, *kw, hooks=record)
    assert steps == []  # finished seeds are skipped
    with pytest.raises(UserError, match="limit_train"):
        ft(mosaic_dir, out, *kw, "data.limit_train=10")  # the folder belongs to another setup


def test_plain_hf_bert_trains_on_padded_batches(tmp_path: Path) -> None:
    seen = {}
    hooks = Hooks(on_model_loaded=lambda t, s, m: seen.update(cls=type(m).__name__, packed=uses_packed_batches(m)))
    model = make_bert_model(tmp_path / "bert")
    summary = ft(model, tmp_path / "o", "tasks.names=sst2", "tasks.seeds=1", "hparams.epochs=1", hooks=hooks)
    assert seen == {"cls": "BertForSequenceClassification", "packed": False}
    assert summary["tasks"]["sst2"]["score"]["n"] == 1


def test_max_length_reaches_the_tokenizer_and_alibi_takes_any_length(mosaic_dir: Path, tmp_path: Path) -> None:
    """--max-length 2048 on an ALiBi model: the examples of a long-text task are cut at 2048
    tokens, not at the recipe's 256, and the recorded hyperparameter is the integer."""
    long_text = " ".join(["the hacker wrote a program"] * 500)
    data = tmp_path / "data" / "SST-2"
    data.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = [f"{long_text} {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(4)]
        (data / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    rc = cli.main(
        ["finetune-glue", str(mosaic_dir), "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "data")]
        + [
            "--tasks",
            "sst2",
            "--seeds",
            "1",
            "--max-length",
            "2048",
            "--hparam",
            "epochs=1",
            "--hparam",
            "batch_size=4",
        ]
        + ["--no-progress", "--device", "cpu"]
    )
    assert rc == 0
    result = json.loads((tmp_path / "o" / "sst2" / "seed42" / "result.json").read_text())
    assert result["hparams"]["max_length"] == 2048 and isinstance(result["hparams"]["max_length"], int)
    assert result["train_tokens"] == 4 * 2048  # every example is 2500+ tokens long: cut at 2048, not 256


def test_trainer_checkpoint_is_exported_then_finetuned(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    make_trainer_checkpoint(tmp_path / "run", step=4, train_seconds=1800.0)
    out = tmp_path / "o"
    ft(tmp_path / "run", out, "tasks.names=sst2", "tasks.seeds=1", "hparams.epochs=1")
    assert (out / "pretrained" / "config.json").is_file()
    result = json.loads((out / "sst2" / "seed42" / "result.json").read_text())
    assert result["init"] == str((out / "pretrained").resolve())


def test_cli_end_to_end_writes_markdown_and_json(
    mosaic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    rc = cli.main(
        [
            "finetune-glue",
            str(mosaic_dir),
            "--out",
            str(out),
            "--data-dir",
            str(TSV),
            "--seeds",
            "1,rte=2",
            "--hparam",
            "epochs=1",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    table = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert list(table["tasks"]) == list(TASKS)
    avg = table["glue_average"]
    assert avg["complete"]
    assert avg["mean"] == pytest.approx(np.mean([t["score"]["mean"] for t in table["tasks"].values()]))
    for task in TASKS.values():
        assert f"| {task.display} |" in md
    assert "**GLUE average**" in md and f"**{avg['mean']:.2f}**" in md
    assert md in capsys.readouterr().out
    rte = table["tasks"]["rte"]
    assert rte["seeds"] == [42, 43] and rte["score"]["std"] is not None and rte["score"]["n"] == 2
    assert set(table["tasks"]["mnli"]["metrics"]) == {"accuracy_m", "accuracy_mm"}
    # both RTE seeds start from the one MNLI seed, and train on every example once (one epoch)
    results = [json.loads((out / "rte" / f"seed{seed}" / "result.json").read_text()) for seed in (42, 43)]
    for result in results:
        assert result["init"] == str((out / "mnli" / "seed42" / "model").resolve())
        assert result["tokens_per_sec"] == pytest.approx(result["train_tokens"] / result["train_seconds"])
        assert result["mfu"] is None  # no GPU peak on the CPU
    assert results[0]["train_tokens"] == results[1]["train_tokens"] > 30 * results[0]["train_examples"] / 10
    assert f"| {rte['tokens_per_sec']:,.0f} | - |" in md


def _bad_label_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(TSV / "SST-2", data / "SST-2")
    path = data / "SST-2" / "train.tsv"
    path.write_text(path.read_text().replace("\t1\n", "\t3\n", 1))
    return data


def _missing_split_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(TSV / "RTE", data / "RTE")
    (data / "RTE" / "dev.tsv").unlink()
    return data


@pytest.mark.parametrize(
    "case,args,expected",
    [
        ("task", ["--tasks", "rte,wnli"], "unknown GLUE task 'wnli'"),
        ("split", ["--tasks", "rte", "--no-mnli-start"], "missing RTE validation split"),
        ("label", ["--tasks", "sst2"], "label '3' outside SST-2's classes 0..1"),
        ("vocab", ["--tasks", "sst2"], "vocabulary mismatch"),
        ("checkpoint-vocab", ["--tasks", "sst2"], "vocabulary mismatch"),
        ("model", ["--tasks", "sst2"], "does not exist"),
        ("weights", ["--tasks", "sst2"], "model.safetensors cannot be read: it is truncated or not a weights file"),
        ("out", ["--tasks", "sst2"], "out cannot be created: "),
        ("out-in-checkpoint", ["--tasks", "sst2"], "refusing to write GLUE results into "),
        ("hparam", ["--hparam", "lr=-1"], "lr=-1.0 is out of range"),
        ("positions", ["--tasks", "sst2", "--max-length", "512"], "longer than the 300 learned position embeddings"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, args: list[str], expected: str, mosaic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, model = TSV, mosaic_dir
    if case == "split":
        data = _missing_split_data(tmp_path)
    elif case == "label":
        data = _bad_label_data(tmp_path)
    elif case == "vocab":
        model = make_mosaic_model(tmp_path / "big", vocab_size=1024)  # its tokenizer has ~100 tokens
    elif case == "checkpoint-vocab":  # the same, as a trainer checkpoint exported on the way
        pytest.importorskip("deepspeed")
        model = make_trainer_checkpoint(tmp_path / "run", step=2, train_seconds=60.0, vocab_size=1024).parent
    elif case == "model":
        model = tmp_path / "no-such-model"
    elif case == "weights":  # a truncated file: found before any task starts, not when one loads it
        model = Path(shutil.copytree(mosaic_dir, tmp_path / "truncated"))
        (model / "model.safetensors").write_bytes((mosaic_dir / "model.safetensors").read_bytes()[:4000])
    elif case == "positions":  # a BERT with 300 learned positions
        model = make_bert_model(tmp_path / "bert")
    out = tmp_path / "out"
    if case == "out":
        (tmp_path / "file").write_text("mine")
        out = tmp_path / "file" / "out"
    elif case == "out-in-checkpoint":  # --out inside a run's checkpoints (or a dataset, an export)
        model = make_trainer_checkpoint(tmp_path / "run", step=2, train_seconds=60.0).parent
        out = tmp_path / "run" / "checkpoints" / "glue"
    rc = cli.main(
        [
            "finetune-glue",
            str(model),
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--seeds",
            "1",
            "--no-progress",
            "--device",
            "cpu",
            *args,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("mosaicbert-ds finetune-glue: error: "), err
    assert expected in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_with_ddp(mosaic_dir: Path, tmp_path: Path) -> None:
    """torchrun with two CPU processes (gloo): ranks split each batch, rank 0 writes the results."""
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mosaicbert_ds.cli",
        "finetune-glue",
        str(mosaic_dir),
        "--out",
        str(out),
        "--data-dir",
        str(TSV),
        "--tasks",
        "rte",
        "--seeds",
        "1,rte=2",
        "--hparam",
        "epochs=2",
        "--save-every",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = json.loads((out / "results.json").read_text())
    assert list(table["tasks"]) == ["mnli", "rte"] and table["tasks"]["rte"]["seeds"] == [42, 43]
    for path in out.glob("*/seed*/result.json"):
        assert json.loads(path.read_text())["world_size"] == 2
    assert (out / "mnli" / "seed42" / "model" / "model.safetensors").is_file()
    assert not list(out.glob("*/seed*/state.pt"))
