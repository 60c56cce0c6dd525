"""What a folder is, told by the files each command leaves in it, and where each command may
write, so that no output is written into another, or swallows one.

| kind (writer) | recognised by |
|---|---|
| dataset (`convert`) | `mosaicbert_index.json`, or the unfinished-conversion marker |
| run folder (`pretrain`) | `.run.lock`, a checkpoint folder `checkpoints/`, or a quickstart marker |
| checkpoint folder (RUN/checkpoints) | `latest` or `model_config.json`, named checkpoints or holding a tag |
| checkpoint tag (`step_N`) | in a checkpoint folder, or holding `complete.json` or `trainer_state.json` |
| export, import, tokenizer, GLUE model | outputs.MARKER with that kind |

`check_destination(dest, writes)` refuses, with one line and before any work, a destination that

- is a folder of another kind (only `pretrain` writes into a run folder, only `convert` into a
  dataset, only `export` over an export, ...; a checkpoint folder or tag is never a destination);
- is inside a dataset, a checkpoint folder, a checkpoint tag or a model folder (export, import,
  tokenizer, GLUE model): those are replaced whole or pruned by their writers;
- is inside one of the entries a run writes (`RUN/checkpoints/...`, `RUN/tensorboard/...`).
  Beside them is fine: `RUN/hf` for an export and `RUN/glue` for GLUE results are the usual places.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

DATASET, RUN, CHECKPOINTS, TAG = "dataset", "run", "checkpoints", "tag"
QUICKSTART_RUN = "quickstart-pretrain"
"""The outputs.MARKER kind of a quickstart's run folder (a run folder like any other)."""
RUN_ENTRIES = ("checkpoints", "tensorboard", "metrics.jsonl", "run_config.json", "ds_config.json", ".run.lock")
"""What `pretrain` writes at the top of its output_dir (train/pretrain.py, train/metrics.py)."""
_TAG = re.compile(r"^step_\d+(_universal)?$")
_WHAT = {
    DATASET: "a dataset",
    RUN: "a run folder",
    CHECKPOINTS: "a checkpoint folder",
    TAG: "a checkpoint tag",
    "export": "an export",
    "import": "an imported model folder",
    "tokenizer": "a tokenizer folder",
    "glue-model": "a GLUE model folder",
}
_CONTAINERS = (DATASET, CHECKPOINTS, TAG, "export", "import", "tokenizer", "glue-model")
"""Kinds nothing else may be written into: their writers replace them whole or prune them."""
_OUTPUT = {
    RUN: "a run",
    DATASET: "a dataset",
    "export": "an export",
    "import": "an imported model",
    "tokenizer": "a tokenizer",
    "glue": "GLUE results",
}


def _is_checkpoint_folder(path: Path) -> bool:
    """`latest` or `model_config.json`, in a folder named checkpoints or holding a step_N folder
    (those names alone are common enough to be a user's file elsewhere)."""
    if not ((path / "latest").is_file() or (path / "model_config.json").is_file()):
        return False
    return path.name == "checkpoints" or any(_TAG.match(p.name) and p.is_dir() for p in path.iterdir())


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of an existing folder (see the table above), or None if it is none of them."""
    from .data.info import INDEX_NAME, PARTIAL_MARKER
    from .outputs import output_kind

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / INDEX_NAME).is_file() or (path / PARTIAL_MARKER).exists():
        return DATASET
    marked = output_kind(path)
    if marked == QUICKSTART_RUN:
        return RUN
    if marked is not None:
        return marked
    if (path / ".run.lock").exists() or (
        (path / "checkpoints").is_dir() and _is_checkpoint_folder(path / "checkpoints")
    ):
        return RUN
    if _TAG.match(path.name) and (
        _is_checkpoint_folder(path.parent) or any((path / f).is_file() for f in ("complete.json", "trainer_state.json"))
    ):
        return TAG
    if _is_checkpoint_folder(path):
        return CHECKPOINTS
    return None


def describe(kind: str) -> str:
    return _WHAT.get(kind, f"a {kind} folder")


def check_destination(dest: str | os.PathLike, writes: str) -> None:
    """Raise UserError if `dest` may not receive what `writes` names: "run", "dataset", "export",
    "import", "tokenizer" or "glue" (GLUE results). URLs are not checked."""
    if "://" in str(dest):
        return
    dest = Path(dest).resolve()
    what = _OUTPUT.get(writes, writes)
    found = folder_kind(dest)
    if found is not None and found != writes:
        raise UserError(f"refusing to write {what} into {dest}: it is {describe(found)}; choose another folder")
    below = dest
    for folder in dest.parents:
        kind = folder_kind(folder)
        if kind in _CONTAINERS:
            raise UserError(
                f"refusing to write {what} into {dest}: it is inside {describe(kind)}, {folder}; "
                "choose a folder outside it"
            )
        if kind == RUN and below.name in RUN_ENTRIES:
            inside = "" if below == dest else "inside "
            raise UserError(
                f"refusing to write {what} into {dest}: it is {inside}{below.name}/ of the run folder "
                f"{folder}; choose a folder beside it (e.g. {folder / 'hf'})"
            )
        below = folder


def check_location(path: str | os.PathLike, what: str, swapped: bool = False, probe: bool = True) -> None:
    """`path` is a folder or can be created, and (with `probe`) a file can be written in it or in
    the nearest existing folder above it (with `swapped`, in its parent: the folder is written
    beside itself and renamed). The probe is one file, removed at once. `what` starts the message."""
    import tempfile

    out = Path(path)
    base = out
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        if base == out:
            raise UserError(f"{what} {out} is a file, not a folder")
        raise UserError(f"{what} {out} cannot be created: {base} is a file")
    if not probe:
        return
    probe_in = out.parent if swapped and base == out else base
    try:
        fd, name = tempfile.mkstemp(prefix=".mosaicbert_write_probe.", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        where = "" if probe_in == out else f"{probe_in}: "
        raise UserError(f"{what} {out} is not writable: {where}{err.strerror or err}") from None
