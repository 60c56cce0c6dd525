"""Checkpoints: DeepSpeed's engine state plus what exact resume needs.

Layout of `<output_dir>/checkpoints/`:
    model_config.json, tokenizer/     what export needs, written once
    latest                            DeepSpeed's pointer to the newest finished tag
    step_0000100/                     DeepSpeed's files (module, ZeRO optimizer shards, scheduler)
        trainer_state.json            step, samples, tokens, hours, world size, data loader state
        rng_rank<r>.pt                each rank's torch / CUDA / numpy / python RNG state

DeepSpeed writes `latest` only after every rank has written its shard, and we write our own files
before that, so a run killed mid-save resumes from the previous finished tag. Resuming on another
number of ranks goes through DeepSpeed's universal checkpoint format (converted once, on rank 0).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

TRAINER_STATE = "trainer_state.json"


def latest_tag(root: str | Path) -> str | None:
    path = Path(root) / "latest"
    return path.read_text().strip() if path.is_file() else None


def read_trainer_state(root: str | Path, tag: str) -> dict[str, Any]:
    path = Path(root) / tag / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {Path(root) / tag} is incomplete or unreadable ({err})") from None


def resolve_resume(resume: str, default_root: Path) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(default_root)
        return (default_root, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, latest_tag(path)
    if (path / TRAINER_STATE).is_file():
        return path.parent, path.name
    raise UserError(f"checkpoint.resume={resume!r} is neither a checkpoint folder (with a 'latest' file) "
                    f"nor a checkpoint tag folder (with {TRAINER_STATE})")


def check_model_matches(root: Path, model_config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another model shape, before any engine is built."""
    path = root / "model_config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "mlp_type", "glu_fused", "position_embedding_type")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs run {model_config.get(k)!r}" for k in keys
            if saved.get(k) != model_config.get(k)]
    if diff:
        raise UserError(f"checkpoint {root} holds another model shape ({'; '.join(diff)})")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, root: Path, tag: str, trainer_state: dict[str, Any], rank: int) -> None:
    """All ranks call this. Our files go in first; DeepSpeed writes `latest` last."""
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        tmp = tag_dir / (TRAINER_STATE + ".tmp")
        tmp.write_text(json.dumps(trainer_state, indent=1))
        os.replace(tmp, tag_dir / TRAINER_STATE)
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": trainer_state})


def prune(root: Path, keep_last: int) -> None:
    """Rank 0: delete all but the newest `keep_last` tags (never the one `latest` names)."""
    if keep_last <= 0:
        return
    current = latest_tag(root)
    tags = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
    for old in tags[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / f"{old.name}_universal", ignore_errors=True)


def to_universal(root: Path, tag: str) -> str:
    """Convert a tag to DeepSpeed's universal format (rank 0 only); returns the new tag."""
    from deepspeed.checkpoint import ds_to_universal

    out_tag = f"{tag}_universal"
    if (root / out_tag / "zero").is_dir():
        return out_tag
    tmp = root / f"{out_tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(root / tag), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    for extra in [TRAINER_STATE] + [p.name for p in (root / tag).glob("rng_rank*.pt")]:
        shutil.copy(root / tag / extra, tmp / extra)
    os.replace(tmp, root / out_tag)
    return out_tag


def load_rng(root: Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has it (it may not after a world-size change)."""
    path = root / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
