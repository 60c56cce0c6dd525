"""The checks `pretrain` runs before the DeepSpeed engine is built (mosaicbert_ds.train.preflight),
on a real converted dataset: each bad input is one UserError line and nothing is written."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from mosaicbert_ds.config import MosaicBertConfig
from mosaicbert_ds.data import read_dataset_info
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.preflight import check_output_dir, check_run
from mosaicbert_ds.train.run_config import load_run_config
from tests.helpers.runs import snapshot


@pytest.fixture
def dataset(loader_data, tmp_path) -> Path:
    """A private copy of the session's loader dataset, so that a test may damage it."""
    return Path(shutil.copytree(loader_data, tmp_path / "data"))


def run_check(data: Path, out: Path, *overrides: str, global_batch: int = 32) -> None:
    cfg = load_run_config("tiny-cpu", [f"data.path={data}", f"output_dir={out}", *overrides])
    info = read_dataset_info(cfg.data.path)
    model = MosaicBertConfig.from_name(cfg.model.preset, **{"vocab_size": info["vocab_size"], **cfg.model.overrides})
    check_run(cfg, model, {"train_batch_size": global_batch}, info)


def fails(data: Path, out: Path, message: str, *overrides: str, global_batch: int = 32) -> str:
    before = snapshot(data)
    with pytest.raises(UserError) as err:
        run_check(data, out, *overrides, global_batch=global_batch)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert snapshot(data) == before  # the dataset is never touched
    assert not out.exists()  # nor is the output folder created
    return text


def train_shards(data: Path) -> list[dict]:
    return json.loads((data / "train" / "index.json").read_text())["shards"]


def test_a_good_dataset_passes_and_writes_nothing(dataset, tmp_path):
    before = snapshot(dataset)
    run_check(dataset, tmp_path / "runs" / "new")
    assert snapshot(dataset) == before and not (tmp_path / "runs").exists()
    assert len(train_shards(dataset)) > 2  # several shards: sizes of all, tokens of a few, were read


def test_missing_eval_split_only_matters_with_eval_on(dataset, tmp_path):
    fails(dataset, tmp_path / "run", "data.eval_split: ", "data.eval_split=held_out")
    run_check(dataset, tmp_path / "run", "data.eval_split=held_out", "eval.interval=0")
    fails(dataset, tmp_path / "run", "data.train_split: ", "data.train_split=nope")


def test_split_index_missing_or_unreadable(dataset, tmp_path):
    (dataset / "val" / "index.json").unlink()
    fails(dataset, tmp_path / "run", "val/index.json is missing")
    (dataset / "val" / "index.json").write_text("{not json")
    fails(dataset, tmp_path / "run", "is not a readable MDS index")


def test_truncated_or_missing_shard(dataset, tmp_path):
    shard = dataset / "train" / train_shards(dataset)[-1]["zip_data"]["basename"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    fails(dataset, tmp_path / "run", f"shard {shard} has {len(data) - 10} bytes, its index says {len(data)}")
    shard.unlink()
    fails(dataset, tmp_path / "run", f"shard {shard} is missing")


def test_corrupt_shard_of_the_right_size(dataset, tmp_path):
    shard = dataset / "train" / train_shards(dataset)[0]["zip_data"]["basename"]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    fails(dataset, tmp_path / "run", f"shard {shard} cannot be read")


def test_token_ids_beyond_the_model_vocabulary(dataset, tmp_path):
    text = fails(
        dataset,
        tmp_path / "run",
        "is not below the model's vocab_size 64",
        "model.overrides={vocab_size: 64, pad_vocab_size_multiple: 1}",
    )
    assert re.search(r"split 'train', shard (\S+/)?shard\.00000\.mds", text), text


def test_too_few_samples_for_one_global_batch(dataset, tmp_path):
    samples = sum(s["samples"] for s in train_shards(dataset))
    fails(
        dataset,
        tmp_path / "run",
        f"has {samples} samples, fewer than one global batch ({samples + 1})",
        global_batch=samples + 1,
    )


def test_split_index_of_another_dataset(dataset, tmp_path):
    index = json.loads((dataset / "mosaicbert_index.json").read_text())
    index["splits"]["train"]["samples"] += 1
    (dataset / "mosaicbert_index.json").write_text(json.dumps(index))
    fails(dataset, tmp_path / "run", "the split does not belong to this dataset")


def test_learned_positions_must_cover_the_sequences(dataset, tmp_path):
    fails(
        dataset,
        tmp_path / "run",
        "learned position embeddings stop at max_position_embeddings=8",
        "model.overrides={position_embedding_type: learned, max_position_embeddings: 8}",
    )


def test_output_folder_is_a_file_or_not_writable(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(UserError, match=r"cannot be created: .*file is a file"):
        check_output_dir(tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "kept").write_text("x")
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: /proc takes no files either
            with pytest.raises(UserError, match="is not writable"):
                check_output_dir("/proc/self/run")
        else:
            with pytest.raises(UserError, match="is not writable"):
                check_output_dir(locked / "run")
    finally:
        locked.chmod(0o700)
    assert [p.name for p in locked.iterdir()] == ["kept"]  # the probe file is gone


def test_output_folder_is_not_a_dataset_export_or_checkpoint_nor_inside_one(dataset, tmp_path):
    from mosaicbert_ds.outputs import output_folder
    from tests.helpers.glue import make_trainer_checkpoint

    with output_folder(tmp_path / "hf", "export") as tmp:
        (tmp / "config.json").write_text("{}")
    make_trainer_checkpoint(tmp_path / "run", step=2, train_seconds=1.0)
    root = tmp_path / "run" / "checkpoints"
    before = snapshot(tmp_path)
    for out, message in (
        (dataset, "it is a dataset"),
        (dataset / "runs" / "a", "it is inside a dataset"),
        (tmp_path / "hf", "it is an export"),
        (tmp_path / "hf" / "run", "it is inside an export"),
        (root, "it is a checkpoint folder"),
        (root / "step_0000002", "it is a checkpoint tag"),
        (root / "step_0000002" / "run", "it is inside a checkpoint tag"),
        (tmp_path / "run" / "tensorboard", "it is tensorboard/ of the run folder"),
    ):
        with pytest.raises(UserError) as err:
            run_check(dataset, out)
        assert str(err.value).startswith(f"refusing to write a run into {out.resolve()}: {message}"), err.value
    assert snapshot(tmp_path) == before
    run_check(dataset, tmp_path / "run")  # a run folder: the same run again (resume)
    run_check(dataset, tmp_path / "run" / "sub")  # beside the run's own entries
