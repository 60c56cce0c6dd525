"""Writing results so that nothing half-written can be taken for finished, and nothing the user
did not create here is deleted.

- Files: `atomic_write_text` / `atomic_write_json` / `atomic_torch_save` write a temporary
  sibling, fsync it and rename it over the target.
- Folders: `output_folder(dest, kind, sources)` checks `dest` (`check_replaceable`), locks it
  against other writers (train.output_lock), removes temporary siblings left by writers of
  this host that were killed, and yields a fresh temporary sibling; when the block finishes it
  gets a marker file naming its kind and the entries written, and is swapped in for `dest`. If
  the block fails, the temporary folder is removed and `dest` is untouched; a failure to write
  (no space, I/O error) is an `OutputError` (one line, exit code 5).
- An existing `dest` is replaced only if its marker says it is this project's output of the same
  kind and it holds nothing but the entries the marker lists: a file the user added (a README in
  an export) makes the command refuse, naming it. `dest` must not be, or hold, one of the
  `sources`, nor be a place `folders.check_destination` refuses (inside a dataset, a checkpoint,
  another output).
- Temporary siblings are named `.<name>.<pid>-<host>.<random>.tmp` (`.old` for the replaced
  folder during the swap), so a later writer can prove a leftover is a dead process's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, UserError

MARKER = ".mosaicbert-ds-output.json"
"""Written last into every folder this project publishes: {"kind": ..., "entries": [...]}, the
entries being the names this project wrote at the top of the folder (each with all below it)."""
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG}


def _tmp_sibling(path: Path) -> Path:
    """A fresh temporary file beside `path`, named by its writer like `temporary_sibling`'s
    folders; the leftovers of a killed writer of `path` are removed first."""
    remove_dead_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{HOST_TAG}.", suffix=".tmp", dir=path.parent)
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


def write_marker(folder: str | os.PathLike, kind: str, entries: Iterable[str] | None = None) -> None:
    """Mark `folder` as this project's `kind` output holding `entries` (default: what it holds now)."""
    folder = Path(folder)
    names = sorted(entries) if entries is not None else sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    atomic_write_json(folder / MARKER, {"kind": kind, "entries": names})


def extra_entries(folder: str | os.PathLike) -> list[str] | None:
    """Names at the top of `folder` that its marker does not list (what the user added there);
    None when the marker lists nothing (no marker, or one written before entries were recorded)."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / MARKER).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER and p.name not in recorded)


def check_replaceable(dest: str | os.PathLike, kind: str, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Raise UserError unless `dest` may be (re)written as a `kind` folder: neither one of `sources`
    nor a folder holding one; in a place that can be written (folders.check_location) and that
    folders.check_destination allows; absent, empty, or this project's own `kind` output holding
    only what its marker lists."""
    from .folders import check_destination, check_location

    dest = Path(dest).resolve()
    for src in sources:
        src = Path(src).resolve()
        if src == dest or dest in src.parents:
            raise UserError(f"refusing to write {dest}: it holds the input {src}; choose another output folder")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise UserError(f"refusing to replace {dest}: it is not a folder")
    check_location(dest, "output folder", swapped=True)
    check_destination(dest, kind)
    if dest.exists() and any(dest.iterdir()):
        found = output_kind(dest)
        if found != kind:
            what = f"a {found} folder" if found else "not a folder this tool wrote"
            raise UserError(
                f"refusing to replace {dest}: it is {what} (expected a {kind} folder); "
                "choose another output folder or remove it yourself"
            )
        extras = extra_entries(dest)
        if extras is None:
            raise UserError(
                f"refusing to replace {dest}: its marker does not list what this tool wrote there "
                "(an older version made it); choose another output folder or remove it yourself"
            )
        if extras:
            more = f" and {len(extras) - 3} more" if len(extras) > 3 else ""
            raise UserError(
                f"refusing to replace {dest}: it holds {', '.join(extras[:3])}{more}, which this tool "
                "did not write; move them out or choose another output folder"
            )


def temporary_sibling(dest: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A fresh empty folder beside `dest`, named so that `remove_dead_leftovers` can tell its owner."""
    dest = Path(dest)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-{HOST_TAG}.", suffix=suffix, dir=dest.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `dest` (folders of `temporary_sibling`, files of the atomic
    writes) whose writer was a process of this host that no longer exists; returns them. A writer
    killed between the two renames of a swap left the previous `dest` in its `.old` folder: it is
    put back first."""
    dest = Path(dest)
    prefix = f".{dest.name}."
    removed = []
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        name = path.name
        if not (name.startswith(prefix) and name.endswith((".tmp", ".old"))):
            continue
        pid, _, host = name[len(prefix) :].split(".")[0].partition("-")
        if host != HOST_TAG or not pid.isdigit() or _alive(int(pid)):
            continue
        if path.is_dir():
            if name.endswith(".old") and not dest.exists() and (path / dest.name).is_dir():
                os.replace(path / dest.name, dest)
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".tmp"):  # a file of atomic_write_bytes or atomic_torch_save
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed


def write_failure(err: BaseException, where: Path) -> str | None:
    """What went wrong, when `err` is a failure to write under `where` (no space, I/O error,
    read-only or denied); None for anything else. Libraries that write through their own code
    (safetensors, torch.save) report a full disk without an errno: little free space left counts."""
    if isinstance(err, (UserError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        return err.strerror or str(err)
    try:
        if shutil.disk_usage(where).free < 2**20:
            return "no space left on device"
    except OSError:
        pass
    return None


@contextlib.contextmanager
def output_folder(dest: str | os.PathLike, kind: str, sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success publish it as `dest`."""
    from .train.output_lock import OutputLock

    dest = Path(dest)
    check_replaceable(dest, kind, sources)
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # deepest first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {dest.parent}: {err.strerror or err}") from None
    try:
        with OutputLock.acquire(dest.parent / f".{dest.name}.mosaicbert-ds.lock", f"{dest}"):
            remove_dead_leftovers(dest)
            tmp = temporary_sibling(dest)
            try:
                yield tmp
                write_marker(tmp, kind)
                for p in [tmp, *tmp.rglob("*")]:
                    p.chmod(0o755 if p.is_dir() else 0o644)
                if dest.exists():
                    check_replaceable(dest, kind, sources)  # again: it may have changed while we wrote
                    old = temporary_sibling(dest, ".old")
                    os.replace(dest, old / dest.name)
                    os.replace(tmp, dest)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, dest)
            except BaseException as err:
                shutil.rmtree(tmp, ignore_errors=True)
                reason = write_failure(err, dest.parent)
                if reason is None:
                    raise
                raise OutputError(f"could not write {dest}: {reason}; nothing there was changed") from None
    except BaseException:
        for folder in created:  # the folders made for `dest`, if still empty: nothing is left behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
