"""`export`, `import` and `quickstart` on bad destinations and damaged inputs: one line on stderr,
exit code 2, and what was there before intact. Checkpoints are the trainer's layout (ZeRO stage 0,
tests/helpers/glue.py), datasets real conversions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mosaicbert_ds.outputs import MARKER, output_folder
from tests.helpers.data import convert_docs, jargon_docs, run_cli, tokenizer_dir
from tests.helpers.glue import make_bert_model, make_trainer_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(code: int, err: str, command: str, *needles: str, exit_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith(f"mosaicbert-ds {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as `pretrain` leaves it: checkpoints/ with one complete tag, run_config.json."""
    make_trainer_checkpoint(tmp_path / "run", step=4, train_seconds=1.0)
    (tmp_path / "run" / "run_config.json").write_text("{}\n")
    return tmp_path / "run"


def test_export_refuses_destinations_that_are_or_are_inside_runs_datasets_tags_and_exports(
    run, tmp_path, tmp_path_factory, capsys
):
    tokenizer_dir(tmp_path_factory)
    data = convert_docs(tmp_path, jargon_docs(40), val_fraction=0)
    code, _, err = run_cli(["export", run, tmp_path / "hf"], capsys)
    assert code == 0, err
    before = snapshot(tmp_path)
    tag = run / "checkpoints" / "step_0000004"
    export = tmp_path / "hf"
    cases = [
        (run, tag, "it is a checkpoint tag"),  # `export RUN RUN/checkpoints/step_N`
        (run, tag / "hf", "it is inside a checkpoint tag"),
        (run, run / "checkpoints" / "hf", "it is inside a checkpoint folder"),
        (export, run, "it is a run folder"),
        (run, run / "tensorboard", "it is tensorboard/ of the run folder"),
        (run, run / "tensorboard" / "hf", "it is inside tensorboard/ of the run folder"),
        (run, data, "it is a dataset"),
        (run, data / "hf", "it is inside a dataset"),
        (run, export / "inner", "it is inside an export"),
    ]
    for src, dest, message in cases:
        code, _, err = run_cli(["export", src, dest], capsys)
        one_line(code, err, "export", f"refusing to write an export into {dest.resolve()}: {message}")
    assert snapshot(tmp_path) == before  # nothing written, nothing removed
    code, _, err = run_cli(["export", run, run / "hf"], capsys)  # beside the run's own entries: fine
    assert code == 0, err


def test_an_export_holding_a_users_file_is_not_replaced(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run_cli(["export", run, out], capsys)[0] == 0
    (out / "README.md").write_text("my notes")
    before = snapshot(out)
    code, _, err = run_cli(["export", run, out], capsys)
    one_line(code, err, "export", f"refusing to replace {out.resolve()}: it holds README.md, which this tool did not")
    assert snapshot(out) == before
    (out / "README.md").unlink()
    assert run_cli(["export", run, out], capsys)[0] == 0  # what the project wrote alone: replaced


def test_an_output_under_a_regular_file_is_one_line(run, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    bert = make_bert_model(tmp_path / "bert")
    for command, src in (("export", run), ("import", bert)):
        code, _, err = run_cli([command, src, tmp_path / "file" / "out"], capsys)
        one_line(code, err, command, f"output folder {tmp_path / 'file' / 'out'} cannot be created: ", "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_export_reads_only_complete_tags_named_inside_the_checkpoint_folder(run, tmp_path, capsys):
    root = run / "checkpoints"
    (root / "step_0000008").mkdir()  # a half-written save: no complete.json
    (root / "step_0000008" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04")
    out = tmp_path / "hf"
    code, _, err = run_cli(["export", run, out, "--tag", "step_0000008"], capsys)
    one_line(code, err, "export", f"checkpoint {root / 'step_0000008'} is not complete: no complete.json")
    code, _, err = run_cli(["export", run, out, "--tag", "../../../../../etc"], capsys)
    one_line(code, err, "export", "checkpoint tag '../../../../../etc' is not the name of a folder in")
    states = root / "step_0000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    code, _, err = run_cli(["export", run, out, "--tag", "step_0000004"], capsys)
    one_line(code, err, "export", "mp_rank_00_model_states.pt is truncated or changed")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_missing_or_corrupt_model_config_is_one_line(run, tmp_path, capsys):
    config = run / "checkpoints" / "model_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    code, _, err = run_cli(["export", run, tmp_path / "hf"], capsys)
    one_line(code, err, "export", f"{config} is not readable JSON")
    config.unlink()
    code, _, err = run_cli(["export", run, tmp_path / "hf"], capsys)
    one_line(code, err, "export", f"checkpoint folder {config.parent} has no model_config.json")
    assert not (tmp_path / "hf").exists()


def test_truncated_weights_are_one_line_for_import(tmp_path, capsys):
    bert = make_bert_model(tmp_path / "bert")
    weights = bert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = run_cli(["import", bert, tmp_path / "imported"], capsys)
    one_line(code, err, "import", f"{weights} cannot be read: it is truncated or not a weights file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]


def test_two_exports_into_one_folder_at_once(run, tmp_path, capsys):
    out = tmp_path / "hf"
    with output_folder(out, "export"):  # an export into `out` in progress (the lock is a real flock)
        code, _, err = run_cli(["export", run, out], capsys)
        one_line(code, err, "export", f"{out} is being written by another process (pid {os.getpid()} on ")
    assert [p.name for p in out.iterdir()] == [MARKER]  # the first export finished, alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # the lock file is gone too


HOLD = """
import sys, time
from mosaicbert_ds.outputs import MARKER, output_folder
with output_folder(sys.argv[1], "export") as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_exports_leftovers_are_removed_by_the_next_one(run, tmp_path, capsys):
    out = tmp_path / "hf"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        writing = [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
        assert sorted(n.rsplit(".", 1)[-1] for n in writing) == ["lock", "tmp"], writing
        code, _, err = run_cli(["export", run, out], capsys)  # while it runs: refused, nothing touched
        one_line(code, err, "export", f"(pid {proc.pid} on ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # what SIGKILL leaves
    code, _, err = run_cli(["export", run, out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
    assert (out / "model.safetensors").stat().st_size > 1000


def test_quickstart_checks_every_output_before_any_work(run, tmp_path, capsys):
    out = tmp_path / "qs"
    with output_folder(out / "model", "export") as tmp:
        (tmp / "config.json").write_text("{}")
    (out / "model" / "NOTES.md").write_text("mine")
    code, _, err = run_cli(["quickstart", out], capsys)
    one_line(code, err, "quickstart", f"refusing to replace {(out / 'model').resolve()}: it holds NOTES.md")
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # no tokenizer, data or run was made
    (out / "model" / "NOTES.md").unlink()
    from mosaicbert_ds.quickstart import start_over

    start_over(out / "pretrain")
    (out / "pretrain" / "metrics.jsonl").write_text("{}\n")
    (out / "pretrain" / "NOTES.md").write_text("mine")
    code, _, err = run_cli(["quickstart", out], capsys)
    one_line(code, err, "quickstart", f"refusing to replace {out / 'pretrain'}: it holds NOTES.md")
    assert (out / "pretrain" / "NOTES.md").read_text() == "mine" and not (out / "data").exists()
    marker = json.loads((out / "pretrain" / ".mosaicbert-ds-output.json").read_text())
    assert marker["kind"] == "quickstart-pretrain" and "checkpoints" in marker["entries"]
