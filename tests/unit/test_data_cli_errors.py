"""Bad input to `convert` and `tokenizer`: one line on stderr, exit code 2, no dataset left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mosaicbert_ds.data import read_dataset_info
from mosaicbert_ds.errors import UserError
from tests.helpers.data import jargon_docs, run_cli, tokenizer_dir, write_jsonl


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory)


def convert_args(tmp_path, tok_dir, *inputs, out=None):
    return [
        "convert",
        *inputs,
        "--tokenizer",
        tok_dir,
        "--out",
        out or tmp_path / "out",
        "--quiet",
        "--workers",
        1,
        "--val-fraction",
        0,
    ]


def assert_user_error(code: int, err: str, *needles: str, command: str = "convert") -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(f"mosaicbert-ds {command}: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_no_dataset(tmp_path) -> None:
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


def test_missing_file(tmp_path, tok_dir, capsys):
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "nope.txt"), capsys)
    assert_user_error(code, err, "no such file", "nope.txt")
    assert_no_dataset(tmp_path)


def test_glob_matching_nothing(tmp_path, tok_dir, capsys):
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, str(tmp_path / "*.jsonl")), capsys)
    assert_user_error(code, err, "matches no files")


def test_empty_corpus(tmp_path, tok_dir, capsys):
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "empty.txt"), capsys)
    assert_user_error(code, err, "no documents")
    assert_no_dataset(tmp_path)


def test_missing_jsonl_field(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello there"], field="body")
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl"), capsys)
    assert_user_error(code, err, "a.jsonl:1", "no field 'text'", "body")
    assert_no_dataset(tmp_path)


def test_missing_parquet_column(tmp_path, tok_dir, capsys):
    pq.write_table(pa.table({"body": ["hello there"]}), tmp_path / "a.parquet")
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.parquet"), capsys)
    assert_user_error(code, err, "no column 'text'", "body")


def test_missing_hf_column(tmp_path, tok_dir, capsys):
    (tmp_path / "hf").mkdir()
    write_jsonl(tmp_path / "hf" / "train.jsonl", ["hello there"], field="body")
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, "--hf-dataset", tmp_path / "hf"), capsys)
    assert_user_error(code, err, "no column 'text'", "body")
    assert_no_dataset(tmp_path)


def test_bad_utf8_fails_by_default_with_file_and_line(tmp_path, tok_dir, capsys):
    # the bad line is the last one: a converter that stopped silently would leave a short dataset
    (tmp_path / "bad.txt").write_bytes(b"\n".join([d.encode() for d in jargon_docs(30)] + [b"caf\xe9 latin-1"]))
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "bad.txt"), capsys)
    assert_user_error(code, err, "bad.txt:31", "not valid UTF-8", "--on-bad-utf8 skip")
    assert_no_dataset(tmp_path)


def test_output_folder_that_is_not_a_dataset(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello there"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    code, _, err = run_cli([*convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl"), "--overwrite"], capsys)
    assert_user_error(code, err, "not empty", "holds no mosaicbert_ds dataset")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_unknown_format_and_bad_options(tmp_path, tok_dir, capsys):
    (tmp_path / "a.csv").write_text("x\n")
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.csv"), capsys)
    assert_user_error(code, err, "cannot tell the format", "--format")
    write_jsonl(tmp_path / "a.jsonl", ["hello there"])
    code, _, err = run_cli([*convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl"), "--max-seq-len", 2], capsys)
    assert_user_error(code, err, "--max-seq-len")
    code, _, err = run_cli(
        ["convert", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "no-tokenizer", "--out", tmp_path / "out"], capsys
    )
    assert_user_error(code, err, "cannot load tokenizer")


def test_too_small_for_the_val_fraction(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello there", "general kenobi"])
    args = [a for a in convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl") if a != "--val-fraction"][:-1]
    code, _, err = run_cli(args, capsys)
    assert_user_error(code, err, "val/ split got no documents")
    assert_no_dataset(tmp_path)


def test_tokenizer_command_errors(tmp_path, capsys):
    code, _, err = run_cli(["tokenizer", tmp_path / "missing.txt", "--out", tmp_path / "tok"], capsys)
    assert_user_error(code, err, "no such file", command="tokenizer")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\n")
    code, _, err = run_cli(["tokenizer", tmp_path / "bad.txt", "--out", tmp_path / "tok"], capsys)
    assert_user_error(code, err, "bad.txt:2", "not valid UTF-8", command="tokenizer")


def test_loader_refuses_what_is_not_a_finished_dataset(tmp_path):
    with pytest.raises(UserError, match="no finished mosaicbert_ds dataset"):
        read_dataset_info(str(tmp_path))
    with pytest.raises(UserError, match="not a folder"):
        read_dataset_info(str(tmp_path / "missing"))


def test_killed_conversion_leaves_nothing_finished_and_reruns(tmp_path, tok_dir, capsys):
    docs = jargon_docs(4000)
    write_jsonl(tmp_path / "big.jsonl", docs * 8)
    cmd = [
        sys.executable,
        "-m",
        "mosaicbert_ds.cli",
        *map(str, convert_args(tmp_path, tok_dir, tmp_path / "big.jsonl")),
        "--shard-size",
        "16kb",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial_train = tmp_path / "out.partial" / "train"
    try:
        deadline = time.time() + 120
        while not list(partial_train.rglob("shard.*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "conversion ended before it could be interrupted: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)  # the converter and its pool, mid-write
    finally:
        proc.wait()
    assert (tmp_path / "out.partial").exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        read_dataset_info(str(tmp_path / "out"))
    with pytest.raises(UserError, match="unfinished"):
        read_dataset_info(str(tmp_path / "out.partial"))

    # re-running the same command finishes the job (a shorter input keeps the test quick)
    write_jsonl(tmp_path / "big.jsonl", docs[:200])
    code, _, err = run_cli(cmd[3:], capsys)
    assert code == 0, err
    assert read_dataset_info(str(tmp_path / "out"))["documents"] == 200
    assert not (tmp_path / "out.partial").exists()
    assert json.loads((tmp_path / "out" / "mosaicbert_index.json").read_text())["splits"]["train"]["samples"] == 200


def test_truncated_gzip_input_is_one_line(tmp_path, tok_dir, capsys):
    import gzip

    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress("\n".join(jargon_docs(200)).encode())[:3000])
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "corpus.txt.gz"), capsys)
    assert_user_error(code, err, "corpus.txt.gz cannot be read: it is truncated or corrupt")
    assert_no_dataset(tmp_path)
    code, _, err = run_cli(["tokenizer", tmp_path / "corpus.txt.gz", "--out", tmp_path / "tok"], capsys)
    assert_user_error(code, err, "corpus.txt.gz cannot be read: it is truncated or corrupt", command="tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt.gz"]


def test_output_under_a_regular_file_or_inside_another_output(tmp_path, tok_dir, capsys):
    from mosaicbert_ds.outputs import output_folder

    write_jsonl(tmp_path / "a.jsonl", jargon_docs(30))
    (tmp_path / "file").write_text("mine")
    under = tmp_path / "file" / "out"
    code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl", out=under), capsys)
    assert_user_error(code, err, f"--out {under} cannot be created: {tmp_path / 'file'} is a file")
    code, _, err = run_cli(["tokenizer", tmp_path / "a.jsonl", "--out", under], capsys)
    assert_user_error(code, err, f"output folder {under} cannot be created", command="tokenizer")
    assert (tmp_path / "file").read_text() == "mine"
    with output_folder(tmp_path / "hf", "export") as tmp:
        (tmp / "config.json").write_text("{}")
    for dest, message in (
        (tmp_path / "hf", "it is an export"),
        (tmp_path / "hf" / "data", "it is inside an export"),
        (tmp_path / "run" / "checkpoints" / "data", "it is inside a checkpoint folder"),
    ):
        if "run" in dest.parts:
            (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000001")
        code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl", out=dest), capsys)
        assert_user_error(code, err, f"refusing to write a dataset into {dest.resolve()}: {message}")
        code, _, err = run_cli(["tokenizer", tmp_path / "a.jsonl", "--out", dest / "tok"], capsys)
        assert_user_error(code, err, "refusing to write a tokenizer into", "it is inside", command="tokenizer")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [".mosaicbert-ds-output.json", "config.json"]


def test_a_dataset_holding_a_users_file_or_a_foreign_partial_is_not_replaced(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", jargon_docs(30))
    args = convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl")
    assert run_cli(args, capsys)[0] == 0
    (tmp_path / "out" / "README.md").write_text("what this dataset is")
    write_jsonl(tmp_path / "a.jsonl", jargon_docs(31))  # another input: a different dataset
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert_user_error(code, err, "refusing to replace the dataset", "it holds README.md, which `convert` did not write")
    assert (tmp_path / "out" / "README.md").is_file() and read_dataset_info(str(tmp_path / "out"))["documents"] == 30
    (tmp_path / "out" / "README.md").unlink()
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "thesis.tex").write_text("mine")
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert_user_error(code, err, "out.partial exists and is not an unfinished conversion")
    assert (tmp_path / "out.partial" / "thesis.tex").read_text() == "mine"
    (tmp_path / "out.partial" / "thesis.tex").unlink()
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0
    assert read_dataset_info(str(tmp_path / "out"))["documents"] == 31


def test_two_conversions_into_one_folder_at_once(tmp_path, tok_dir, capsys):
    """A conversion into `out` in progress (the same real flock `convert` takes) makes a second
    one refuse, naming the holder, and leave the first one's partial folder alone."""
    from mosaicbert_ds.train.output_lock import OutputLock

    write_jsonl(tmp_path / "a.jsonl", jargon_docs(30))
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / ".mosaicbert_partial").write_text("conversion in progress\n")
    with OutputLock.acquire(tmp_path / ".out.mosaicbert-ds.lock", str(out)):
        code, _, err = run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl"), capsys)
        assert_user_error(code, err, f"{out} is being written by another process (pid {os.getpid()} on ")
        assert not out.exists() and [p.name for p in (tmp_path / "out.partial").iterdir()] == [".mosaicbert_partial"]
    assert run_cli(convert_args(tmp_path, tok_dir, tmp_path / "a.jsonl"), capsys)[0] == 0
    assert read_dataset_info(str(out))["documents"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no lock file, no partial left
