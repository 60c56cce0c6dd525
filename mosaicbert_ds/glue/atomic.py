"""The GLUE code's names for the project's atomic writes (mosaicbert_ds.outputs).

A result file's presence is what marks a task seed as finished, so it must never exist
half-written; a folder that is replaced (the MNLI model) is complete before it gets its name, and
an existing folder there is replaced only if this project wrote it and it holds nothing the user
added (outputs' marker file lists what was written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    output_kind,
    remove_dead_leftovers,
    temporary_sibling,
    write_marker,
)

MODEL_KIND = "glue-model"


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def torch_save(obj: Any, path: Path) -> None:
    atomic_torch_save(obj, path)


def tmp_dir_for(path: Path) -> Path:
    """A fresh, uniquely named empty sibling folder to fill before `replace_dir` gives it `path`'s name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)
    return temporary_sibling(path)


def replace_dir(tmp: Path, path: Path, kind: str | None = None) -> None:
    """Publish the finished folder `tmp` as `path`. An existing `path` is replaced only if it is
    this project's output of the same kind (default: the kind `tmp` is marked with, else a GLUE
    model folder); anything else is refused with a UserError and `tmp` is removed."""
    import os
    import shutil

    tmp, path = Path(tmp), Path(path)
    kind = kind or output_kind(tmp) or MODEL_KIND
    try:
        check_replaceable(path, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_kind(tmp) is None:
        write_marker(tmp, kind)
    if path.exists():
        old = temporary_sibling(path, ".old")
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
