"""The publish-or-nothing rules every command that writes a folder follows (mosaicbert_ds.outputs)."""

from __future__ import annotations

import json
import stat

import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.outputs import MARKER, atomic_write_json, output_folder, output_kind


def test_folder_is_published_whole_with_marker_and_readable(tmp_path):
    dest = tmp_path / "model"
    with output_folder(dest, "export") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
        assert not dest.exists()
    assert output_kind(dest) == "export" and (dest / "weights.bin").read_bytes() == b"x"
    assert stat.S_IMODE((dest / "weights.bin").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_own_output_of_same_kind_is_replaced(tmp_path):
    dest = tmp_path / "model"
    with output_folder(dest, "export") as tmp:
        (tmp / "a").write_text("1")
    with output_folder(dest, "export") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("marker", [None, "glue"])
def test_foreign_or_other_kind_folder_is_refused_and_kept(tmp_path, marker):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    if marker:
        (dest / MARKER).write_text(json.dumps({"kind": marker}))
    with pytest.raises(UserError, match="refusing to (replace|write an export into)"):
        with output_folder(dest, "export"):
            pass
    assert (dest / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_folder_holding_the_source_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for dest in (run, run / "checkpoints"):
        with pytest.raises(UserError, match="holds the input"):
            with output_folder(dest, "export", sources=[run / "checkpoints"]):
                pass
    assert (run / "checkpoints").is_dir()


def test_failure_inside_the_block_leaves_dest_untouched(tmp_path):
    dest = tmp_path / "model"
    with output_folder(dest, "export") as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(RuntimeError):
        with output_folder(dest, "export") as tmp:
            (tmp / "v2").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (dest / "v1").exists() and not (dest / "v2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_json_is_world_readable_and_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").read_text().strip().startswith("{")
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
