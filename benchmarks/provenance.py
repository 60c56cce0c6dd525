"""Where a benchmark figure came from: commit, dirty-tree flag, command line, software versions.

Every benchmark puts this under the key "provenance" of the JSON it writes:

    from .provenance import write_result
    write_result(args.out, result)          # result["provenance"] = provenance(); atomic write

    {"commit": "1d102c6...", "dirty": false, "command": "python -m benchmarks.step --quick",
     "cwd": "/repo", "host": "node-1", "time": "2026-11-29T06:20:00+00:00",
     "versions": {"python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
                  "deepspeed": "0.19.8", "transformers": "5.0.0", "mosaicbert_ds": "0.1.0"},
     "device": "NVIDIA H200"}

`commit` and `dirty` come from git in the repository that holds this file (None outside a git
checkout, e.g. an installed wheel); `dirty` is True when tracked files differ from the commit, so
a figure measured with uncommitted code says so. `benchmarks.report` reads this block and falls
back to a results folder's `sources.json` for JSON written before it existed.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mosaicbert_ds.outputs import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "deepspeed", "transformers", "mosaicml-streaming", "numpy", "mosaicbert_ds")


def _git(*args: str, cwd: Path = REPO) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(cwd: Path = REPO) -> tuple[str | None, bool | None]:
    """(full commit hash, tracked files modified?) of the checkout at `cwd`; (None, None) outside git."""
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return commit, bool(status) if status is not None else None


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where a package is missing), plus python and torch's CUDA."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["cuda"] = torch.version.cuda
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: `python -m package.module args` for a module run, else the script."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name != "__main__" else ["python", argv[0]]
    return shlex.join(head + argv[1:])


def provenance(argv: Sequence[str] | None = None, device: str | None = None) -> dict[str, Any]:
    """The provenance block for a result written now (see the module docstring)."""
    commit, dirty = git_state()
    if device is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    return {
        "commit": commit,
        "dirty": dirty,
        "command": command_line(argv),
        "cwd": str(Path.cwd()),
        "host": platform.node(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": device,
    }


def write_result(path: str | Path, result: Mapping[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Write `result` as indented JSON with its "provenance" block (atomically); returns what was written."""
    out = {**result, "provenance": provenance(argv, device=result.get("device"))}
    atomic_write_json(path, out)
    return out


def describe(prov: Mapping[str, Any] | None) -> str:
    """One line for console output: commit (and dirty flag), versions."""
    if not prov:
        return "provenance unknown"
    commit = (prov.get("commit") or "no git")[:10] + (" (dirty tree)" if prov.get("dirty") else "")
    v = prov.get("versions") or {}
    soft = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "triton", "deepspeed") if v.get(k))
    return f"commit {commit}; {soft}; {prov.get('command', '')}"
