"""Reading GLUE splits (TSV and JSONL layouts, label checks), task options, and batch layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.glue.data import load_split, tokenize
from mosaicbert_ds.glue.tasks import TASKS, apply_overrides, parse_seed_counts, parse_tasks
from tests.helpers.glue import JSONL, TSV, make_tokenizer


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reads_from_glue_tsv(name: str) -> None:
    task = TASKS[name]
    train = load_split(task, "train", TSV)
    assert len(train) == (96 if name == "mnli" else 48) and train.skipped == 0
    assert (train.text_b is None) == (task.fields[1] is None)
    for _, split in task.eval_splits:
        dev = load_split(task, split, TSV)
        assert len(dev) == 24
        if task.regression:
            assert dev.labels.dtype == np.float32 and dev.labels.min() >= 0 and dev.labels.max() <= 5
        else:
            assert set(dev.labels.tolist()) == set(range(task.num_labels))


def test_tsv_columns_and_label_names() -> None:
    mnli = load_split(TASKS["mnli"], "validation_matched", TSV)
    # row i has gold label i % 3 (entailment, neutral, contradiction) and its keyword in the hypothesis
    assert mnli.labels[:3].tolist() == [0, 1, 2]
    assert "alpha" in mnli.text_b[0].split() and "gamma" in mnli.text_b[2].split()
    assert "(" not in mnli.text_a[0]  # sentence1, not one of the parse columns
    qnli = load_split(TASKS["qnli"], "train", TSV)
    assert qnli.labels[:2].tolist() == [0, 1] and "no" in qnli.text_b[1].split()  # not_entailment -> 1
    cola = load_split(TASKS["cola"], "train", TSV)  # no header: label column 1, sentence column 3
    assert cola.labels[0] == 1 and "fine" in cola.text_a[0].split()
    mrpc = load_split(TASKS["mrpc"], "train", TSV)
    assert mrpc.labels[1] == 1 and "same" in mrpc.text_b[1].split()
    stsb = load_split(TASKS["stsb"], "train", TSV)
    assert stsb.labels[3] == 3.0 and stsb.text_b[3].split().count("match") == 3


def test_jsonl_with_hf_field_names() -> None:
    rte = load_split(TASKS["rte"], "validation", JSONL)
    assert len(rte) == 24 and rte.labels[:2].tolist() == [0, 1]
    stsb = load_split(TASKS["stsb"], "train", JSONL, limit=10)
    assert len(stsb) == 10 and stsb.labels.dtype == np.float32 and stsb.labels[5] == 5.0


def _copy_task(tmp_path: Path, folder: str) -> Path:
    shutil.copytree(TSV / folder, tmp_path / folder)
    return tmp_path / folder


def _edit_line(path: Path, line_no: int, old: str, new: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert old in lines[line_no - 1]
    lines[line_no - 1] = lines[line_no - 1].replace(old, new)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "folder,task,line_no,old,new",
    [
        ("SST-2", "sst2", 3, "\t1", "\t2"),  # class outside 0..1
        ("STS-B", "stsb", 3, "\t1.000", "\t7.500"),  # score outside 0..5
        ("MNLI", "mnli", 3, "\tneutral", "\tmaybe"),  # unknown label name
        ("CoLA", "cola", 1, "gj04\t1\t", "gj04\tx\t"),  # not a class number (no header)
    ],
)
def test_label_outside_task_range_is_a_user_error(
    tmp_path: Path, folder: str, task: str, line_no: int, old: str, new: str
) -> None:
    _edit_line(_copy_task(tmp_path, folder) / "train.tsv", line_no, old, new)
    with pytest.raises(UserError, match=f"train.tsv line {line_no}: label"):
        load_split(TASKS[task], "train", tmp_path)


def test_missing_split_or_task_folder(tmp_path: Path) -> None:
    (_copy_task(tmp_path, "RTE") / "dev.tsv").unlink()
    with pytest.raises(UserError, match="missing RTE validation split"):
        load_split(TASKS["rte"], "validation", tmp_path)
    with pytest.raises(UserError, match="no folder for MRPC"):
        load_split(TASKS["mrpc"], "train", tmp_path)


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = _copy_task(tmp_path, "QQP") / "train.tsv"
    with path.open("a", encoding="utf-8") as f:
        f.write("999\tonly three\tfields\n")
    ex = load_split(TASKS["qqp"], "train", tmp_path)
    assert len(ex) == 48 and ex.skipped == 1


def test_task_names_seeds_and_overrides() -> None:
    assert [t.name for t in parse_tasks("STS-B,rte,sst-2,MNLI")] == ["mnli", "sst2", "rte", "stsb"]
    assert len(parse_tasks("all")) == 8
    with pytest.raises(UserError, match="unknown GLUE task 'wnli'"):
        parse_tasks("rte,wnli")
    tasks = parse_tasks("all")
    assert parse_seed_counts(None, tasks) == {
        "mnli": 1,
        "qnli": 1,
        "qqp": 1,
        "sst2": 5,
        "cola": 5,
        "rte": 5,
        "mrpc": 5,
        "stsb": 5,
    }
    assert parse_seed_counts("3,mnli=1", tasks)["rte"] == 3 and parse_seed_counts("3,mnli=1", tasks)["mnli"] == 1
    with pytest.raises(UserError):
        parse_seed_counts("rte=0", tasks)
    hp = apply_overrides(["epochs=1", "rte.lr=2e-5", "batch_size=8"])
    assert hp["rte"].lr == 2e-5 and hp["mrpc"].lr == 8e-5 and hp["mnli"].epochs == 1 and hp["qqp"].batch_size == 8
    assert hp["mnli"].beta2 == 0.98 and hp["mnli"].eps == 1e-6 and hp["mnli"].max_length == 256
    for bad in ("lr", "foo=1", "lr=fast", "lr=-1", "wnli.lr=1e-5"):
        with pytest.raises(UserError):
            apply_overrides([bad])


def test_paper_recipe_table() -> None:
    recipe = {
        n: (t.hparams.lr, t.hparams.weight_decay, t.hparams.epochs, t.hparams.batch_size, t.from_mnli)
        for n, t in TASKS.items()
    }
    assert recipe == {
        "mnli": (5e-5, 5e-6, 3, 48, False),
        "qnli": (1e-5, 1e-6, 10, 16, False),
        "qqp": (3e-5, 3e-6, 5, 16, False),
        "sst2": (3e-5, 3e-6, 3, 16, False),
        "cola": (5e-5, 5e-6, 10, 32, False),
        "rte": (1e-5, 1e-5, 3, 16, True),
        "mrpc": (8e-5, 8e-6, 10, 32, True),
        "stsb": (3e-5, 3e-6, 10, 32, True),
    }


def test_packed_and_padded_batches_agree(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    data = tokenize(tok, load_split(TASKS["mrpc"], "train", TSV), max_length=256)
    index = np.array([5, 0, 17, 3])
    packed = data.batch(index, packed=True)
    padded = data.batch(index, packed=False, pad_id=tok.pad_token_id)
    lengths = padded["attention_mask"].sum(1)
    cu = packed["cu_seqlens"]
    assert cu.dtype.is_floating_point is False and str(cu.dtype) == "torch.int32"
    assert cu.tolist() == [0] + np.cumsum(lengths.numpy()).tolist()
    assert packed["max_seqlen"] == int(lengths.max()) == padded["input_ids"].shape[1]
    assert packed["input_ids"].shape == packed["token_type_ids"].shape == (int(cu[-1]),)
    mask = padded["attention_mask"].bool()
    assert packed["input_ids"].tolist() == padded["input_ids"][mask].tolist()
    assert packed["token_type_ids"].tolist() == padded["token_type_ids"][mask].tolist()
    # each sequence opens with [CLS] (what the classifier pools) and has a second segment
    assert (packed["input_ids"][cu[:-1].long()] == tok.cls_token_id).all()
    assert packed["token_type_ids"].sum() > 0
    assert packed["labels"].tolist() == data.labels[index].tolist()


def test_truncation_to_max_length(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    data = tokenize(tok, load_split(TASKS["mnli"], "train", TSV), max_length=8)
    assert np.diff(data.offsets).max() == 8
