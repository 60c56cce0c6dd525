"""Writing results so that nothing half-written can be taken for finished, and nothing the user
did not create here is deleted.

- Files: `atomic_write_text` / `atomic_write_json` / `atomic_torch_save` write a temporary
  sibling, fsync it and rename it over the target.
- Folders: `output_folder(dest, kind, sources)` yields a fresh temporary sibling with a unique
  name; when the block finishes it gets a marker file and is swapped in for `dest`. An existing
  `dest` is replaced only if its marker says it is this project's output of the same kind;
  anything else is refused with a `UserError`, as is a `dest` that is, or contains, one of the
  `sources`. If the block fails, the temporary folder is removed and `dest` is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

MARKER = ".mosaicbert-ds-output.json"
"""Written last into every folder this project publishes: {"kind": ...}."""


def _tmp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared like the folder
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind recorded in a folder's marker, or None if it is not this project's output."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_replaceable(dest: str | os.PathLike, kind: str, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Raise UserError unless `dest` may be (re)written as a `kind` folder: absent, or this
    project's own `kind` output, and neither one of `sources` nor a folder holding one."""
    dest = Path(dest).resolve()
    for src in sources:
        src = Path(src).resolve()
        if src == dest or dest in src.parents:
            raise UserError(f"refusing to write {dest}: it holds the input {src}; choose another output folder")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise UserError(f"refusing to replace {dest}: it is not a folder")
    if dest.exists() and any(dest.iterdir()) and output_kind(dest) != kind:
        found = output_kind(dest)
        what = f"a {found} folder" if found else "not a folder this tool wrote"
        raise UserError(
            f"refusing to replace {dest}: it is {what} (expected a {kind} folder); "
            "choose another output folder or remove it yourself"
        )


@contextlib.contextmanager
def output_folder(dest: str | os.PathLike, kind: str, sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success publish it as `dest`."""
    dest = Path(dest)
    check_replaceable(dest, kind, sources)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if dest.exists():
            check_replaceable(dest, kind, sources)  # again: it may have changed while we wrote
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
