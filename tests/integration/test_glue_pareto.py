"""`mosaicbert-ds pareto`: listings, hours from the trainer, finetuning each checkpoint, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mosaicbert_ds import cli
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.glue.pareto import resolve_entries
from tests.helpers.glue import TSV, make_mosaic_model, make_trainer_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_finetunes_each_checkpoint_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_mosaic_model(tmp_path / "ckpt-a", seed=0)
    make_mosaic_model(tmp_path / "ckpt-b", seed=1)
    listing = tmp_path / "checkpoints.json"
    listing.write_text(
        json.dumps([{"path": "ckpt-a", "hours": 1.0, "run": "tiny"}, {"path": "ckpt-b", "hours": 2.5, "run": "tiny"}])
    )
    out = tmp_path / "pareto"
    args = [
        "pareto",
        str(listing),
        "--out",
        str(out),
        "--data-dir",
        str(TSV),
        "--tasks",
        "sst2,cola",
        "--seeds",
        "2",
        "--hparam",
        "epochs=8",
        "--hparam",
        "lr=1e-3",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert cli.main(args) == 0
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    points = json.loads((out / "pareto.json").read_text())["points"]
    assert [(p["label"], p["hours"]) for p in points] == [("ckpt-a", 1.0), ("ckpt-b", 2.5)]
    for p in points:
        summary = json.loads((out / p["label"] / "results.json").read_text())
        assert p["average"] == pytest.approx(summary["glue_average"]["mean"])
        assert p["sem"] == pytest.approx(summary["glue_average"]["sem"])
        assert summary["tasks"]["sst2"]["seeds"] == [42, 43] and not p["complete"]
    assert any(p["sem"] > 0 for p in points)  # seeds differ: error bars are not all zero
    assert "| tiny | ckpt-b | 2.5 |" in (out / "pareto.md").read_text()
    capsys.readouterr()

    # A second look only reads what is there: the finished results are not redone.
    stamp = (out / "ckpt-a" / "sst2" / "seed42" / "result.json").stat().st_mtime_ns
    (out / "pareto.png").unlink()
    assert cli.main(args + ["--no-finetune"]) == 0
    assert (out / "pareto.png").is_file()
    assert (out / "ckpt-a" / "sst2" / "seed42" / "result.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "pareto.json").read_text())["points"] == points


def test_hours_from_trainer_state_or_metrics_log(tmp_path: Path) -> None:
    make_trainer_checkpoint(tmp_path / "run", step=3500, train_seconds=5400.0)
    results = tmp_path / "results.json"
    results.write_text("{}")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 1000, "progress/train_hours": 0.5, "loss/train": 3.0},
                {"step": 2000, "loss/train": 2.5},  # no clock in this record
                {"step": 3000, "progress/train_hours": 1.25},
            ]
        )
        + "\n"
    )
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,step,label,results\nrun/checkpoints/step_0003500,,from-state,\n,2500,from-log,results.json\n"
    )
    entries = resolve_entries(listing, metrics)
    assert [(e["label"], e["hours"]) for e in entries] == [("from-state", 1.5), ("from-log", 0.5)]
    assert entries[1]["results"] == str(results.resolve())


@pytest.mark.parametrize(
    "rows,error",
    [
        ([{"path": "m"}], "give 'hours'"),
        ([{"path": "m", "hours": 1}, {"path": "m", "hours": 2}], "used twice"),
        ([{"path": "missing", "hours": 1}], "does not exist"),
        ([{"path": "m", "hours": "soon"}], "is not a number"),
        ([], "no checkpoints"),
    ],
)
def test_bad_listing_is_a_user_error(tmp_path: Path, rows: list, error: str) -> None:
    (tmp_path / "m").mkdir()
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=error):
        resolve_entries(listing, None)


def test_bad_listing_via_cli_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"path": ".", "step": 10}]))
    out = tmp_path / "out"
    assert cli.main(["pareto", str(listing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mosaicbert-ds pareto: error: ")
    assert not out.exists()


def test_out_under_a_regular_file_is_one_line_before_any_finetuning(tmp_path: Path, capsys) -> None:
    (tmp_path / "m").mkdir()
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"path": str(tmp_path / "m"), "hours": 1}]))
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    assert cli.main(["pareto", str(listing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mosaicbert-ds pareto: error: --out {out} cannot be created: {tmp_path / 'file'} is a file"]
    assert (tmp_path / "file").read_text() == "mine"
