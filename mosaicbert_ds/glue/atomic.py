"""Writes that either happen whole or not at all: a tmp file (or folder) and then a rename.

A result file's presence is what marks a task seed as finished, so it must never exist
half-written; a folder that is replaced (the MNLI model) is complete before it gets its name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def tmp_dir_for(path: Path) -> Path:
    """An empty sibling folder to fill before `replace_dir` gives it `path`'s name."""
    tmp = _tmp(Path(path))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing an older one there."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
