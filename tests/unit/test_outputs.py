"""The publish-or-nothing rules every command that writes a folder follows (mosaicbert_ds.outputs)."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.outputs import (
    HOST_TAG,
    MARKER,
    atomic_write_json,
    output_folder,
    output_kind,
    remove_dead_leftovers,
)


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


def test_a_folder_holding_files_the_tool_did_not_write_is_not_replaced(tmp_path):
    dest = tmp_path / "model"
    with output_folder(dest, "export") as tmp:
        (tmp / "weights.bin").write_bytes(b"v1")
    assert json.loads((dest / MARKER).read_text()) == {"kind": "export", "entries": ["weights.bin"]}
    (dest / "README.md").write_text("mine")
    with pytest.raises(UserError, match="it holds README.md, which this tool did not write"):
        with output_folder(dest, "export"):
            pass
    assert (dest / "README.md").read_text() == "mine" and (dest / "weights.bin").read_bytes() == b"v1"
    (dest / MARKER).write_text(json.dumps({"kind": "export"}))  # a marker that lists nothing
    (dest / "README.md").unlink()
    with pytest.raises(UserError, match="its marker does not list what this tool wrote there"):
        with output_folder(dest, "export"):
            pass
    assert (dest / "weights.bin").read_bytes() == b"v1"


def test_leftovers_of_dead_writers_of_this_host_are_removed_and_nothing_else(tmp_path):
    dest = tmp_path / "model"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with output_folder(dest, "export") as tmp:
        (tmp / "v1").write_text("1")
    keep = [
        tmp_path / f".model.{os.getpid()}-{HOST_TAG}.alive.tmp",  # a live writer's
        tmp_path / f".model.{dead.pid}-0000beef.otherhost.tmp",  # another host's: its pid says nothing here
        tmp_path / ".model.notes.tmp",  # not named by a writer
    ]
    gone = tmp_path / f".model.{dead.pid}-{HOST_TAG}.killed.tmp"
    for path in [*keep, gone]:
        path.mkdir()
        (path / "x").write_text("x")
    old = tmp_path / f".model.{dead.pid}-{HOST_TAG}.swap.old"  # killed between the two renames
    old.mkdir()
    os.replace(dest, old / "model")
    assert sorted(remove_dead_leftovers(dest)) == sorted([gone, old])
    assert (dest / "v1").read_text() == "1"  # the previous folder is back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *(p.name for p in keep)])


def test_the_lock_beside_the_folder_is_held_while_writing_and_removed_after(tmp_path):
    dest = tmp_path / "model"
    with output_folder(dest, "export"):
        assert (tmp_path / ".model.mosaicbert-ds.lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match=f"{dest} is being written by another process \\(pid {os.getpid()} on "):
            with output_folder(dest, "export"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_leaves_no_folder_it_created(tmp_path):
    dest = tmp_path / "new" / "deeper" / "model"
    with pytest.raises(UserError, match="no such checkpoint"):
        with output_folder(dest, "export"):
            raise UserError("no such checkpoint")  # e.g. a bad --tag, found once the lock is held
    assert list(tmp_path.iterdir()) == []


def test_a_killed_atomic_writes_temporary_file_is_removed_by_the_next_write(tmp_path):
    from mosaicbert_ds.outputs import atomic_write_json

    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f".results.json.{dead.pid}-{HOST_TAG}.killed.tmp"
    keep = [
        tmp_path / f".results.json.{os.getpid()}-{HOST_TAG}.writing.tmp",  # a live writer's
        tmp_path / ".results.json.notes.tmp",  # not named by a writer
        tmp_path / f".other.json.{dead.pid}-{HOST_TAG}.killed.tmp",  # another file's: its writer cleans it
    ]
    for path in [gone, *keep]:
        path.write_text("half")
    atomic_write_json(tmp_path / "results.json", {"ok": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.json", *(p.name for p in keep)])
