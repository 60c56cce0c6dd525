"""A run's output folder: one run per folder, its files, and the lock that keeps a second run out.

    <output_dir>/
        .run.lock            flock held by rank 0 while the run lives
        run_config.json      the resolved run (the values the engine runs, deepspeed_config included)
        ds_config.json       the DeepSpeed config
        metrics.jsonl        one row per log interval and evaluation
        tensorboard/         the same numbers as event files
        checkpoints/         train.checkpoint's layout (model_config.json, tokenizer/, step_*/)

A folder's checkpoints belong to the run that wrote them: a run starts there only by resuming
them. A fresh start (checkpoint.resume=none, or a checkpoint elsewhere) over them is refused,
unless overwrite_output_dir is set; then exactly the files listed above are deleted first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..config import MosaicBertConfig
from ..errors import UserError
from ..folders import RUN_ENTRIES
from ..outputs import atomic_write_json, atomic_write_text
from . import checkpoint as ckpt
from .run_config import RunConfig

RUN_FILES = tuple(name for name in RUN_ENTRIES if name != ".run.lock")
"""What a run writes into its output_dir besides the lock (mosaicbert_ds.folders.RUN_ENTRIES), and
all that overwrite_output_dir deletes."""


def check_fresh_start(cfg: RunConfig, resume: tuple[Path, str] | None) -> bool:
    """Whether this run replaces another run's checkpoints in its output_dir (overwrite_output_dir);
    UserError when it would without being asked to."""
    root = Path(cfg.output_dir) / "checkpoints"
    tags = ckpt.step_tags(root)
    resumes_own = resume is not None and resume[0].resolve() == root.resolve()
    if not tags or resumes_own:
        if cfg.overwrite_output_dir and cfg.checkpoint.resume == "auto":
            raise UserError(
                "overwrite_output_dir needs checkpoint.resume=none (or a checkpoint elsewhere): with "
                "resume=auto, running the same command again would delete its own progress"
            )
        return False
    if not cfg.overwrite_output_dir:
        start = "a fresh start" if resume is None else f"a start from {resume[0] / resume[1]}"
        raise UserError(
            f"output_dir {cfg.output_dir} holds another run's checkpoints ({len(tags)} step folders, "
            f"newest {tags[-1]}) and {start} would overwrite them; resume it (checkpoint.resume=auto), "
            "choose another output_dir, or set overwrite_output_dir=true to delete them"
        )
    return True


def clear_previous_run(out_dir: Path) -> None:
    """Rank 0, holding the lock: delete what an earlier run wrote here (RUN_FILES), nothing else."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_run_files(
    cfg: RunConfig, ds_config: dict[str, Any], model_config: MosaicBertConfig, info: dict[str, Any]
) -> None:
    """Rank 0: the resolved configs, and what export needs beside the checkpoints."""
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "run_config.json", cfg.to_dict())
    atomic_write_json(out_dir / "ds_config.json", ds_config)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt_root / "model_config.json", model_config.to_json_string())
    tokenizer_dir = Path(info["tokenizer_dir"]) if info.get("tokenizer_dir") else None
    if tokenizer_dir and tokenizer_dir.is_dir() and not (ckpt_root / "tokenizer").exists():
        tmp = ckpt_root / f".tokenizer.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tmp)
        os.replace(tmp, ckpt_root / "tokenizer")
