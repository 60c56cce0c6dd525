"""Running `mosaicbert-ds pretrain` in a subprocess on the CPU, as a user would, and reading what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pretrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mosaicbert_ds.cli", "pretrain", *args]


def cpu_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def pretrain(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cpu_env())


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny-cpu recipe on `data`, logging every step to metrics.jsonl only."""
    return [
        "tiny-cpu",
        f"data.path={data}",
        f"output_dir={out}",
        "log.interval=1",
        "eval.interval=0",
        "log.progress_bar=false",
        "log.tensorboard=false",
        *extra,
    ]


def last_line(res: subprocess.CompletedProcess) -> str:
    return res.stderr.strip().splitlines()[-1]


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what 'left intact' is checked against."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
