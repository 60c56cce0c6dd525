"""Checkpoints: DeepSpeed's engine state plus what exact resume needs, and proof of completeness.

Layout of `<output_dir>/checkpoints/`:
    model_config.json, tokenizer/     what export needs, written once
    latest                            the newest complete tag (a hint: the folders decide)
    step_0000100/                     DeepSpeed's files (module, ZeRO optimizer shards, scheduler)
        trainer_state.json            step, samples, tokens, hours, world size, data loader state
        rng_rank<r>.pt                each rank's torch / CUDA / numpy / python RNG state
        complete.json                 written last, by rank 0, after every rank's files

A tag is *complete* when its `complete.json` exists and every file it lists is there with the
listed size: a save that was killed, ran out of disk, or lost a shard afterwards is never taken
for finished. `latest` is written (atomically) only after the marker; when it is empty, missing,
or names a damaged tag, the newest complete tag is found from the folders themselves, and a
damaged newer tag is skipped with a warning. Resuming on another number of ranks goes through
DeepSpeed's universal checkpoint format (converted once, on rank 0).

`complete_tags(root)` and `resolve_tag(root, tag)` are the entry points for anything that reads a
checkpoint (resume, export); a tag is the name of a folder inside the checkpoint folder, never a
path. `read_model_config(root)` reads `model_config.json` or says in one line why it cannot.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, first_line
from ..outputs import atomic_torch_save, atomic_write_json, atomic_write_text

TRAINER_STATE = "trainer_state.json"
COMPLETE = "complete.json"
_TAG = re.compile(r"^step_(\d+)(_universal)?$")


def _latest_hint(root: Path) -> str | None:
    try:
        text = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def tag_step(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def step_tags(root: str | Path, universal: bool = False) -> list[str]:
    """Every step_* folder under `root`, oldest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and _TAG.match(p.name) and p.name.endswith("_universal") == universal
    ]
    return sorted(tags, key=lambda t: tag_step(t) or 0)


def _files(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def problem(root: str | Path, tag: str) -> str | None:
    """Why `tag` is not a complete checkpoint, or None if it is."""
    tag_dir = Path(root) / tag
    if not tag_dir.is_dir():
        return "no such folder"
    try:
        marker = json.loads((tag_dir / COMPLETE).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE} is unreadable"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} when saved)"
    return None


def complete_tags(root: str | Path) -> list[str]:
    """The complete step_* tags under a checkpoint folder, oldest first."""
    return [t for t in step_tags(root) if problem(root, t) is None]


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"mosaicbert-ds: warning: {message}", file=sys.stderr, flush=True)


def resolve_tag(root: str | Path, tag: str | None = None) -> str:
    """A complete tag to read: `tag` itself (refused unless complete), or the newest complete tag,
    warning about newer damaged ones and about a `latest` that disagrees. UserError if none."""
    root = Path(root)
    if tag is not None:
        if tag in ("", ".", "..") or "/" in tag or "\\" in tag or "\0" in tag:
            newest = step_tags(root)
            example = f" such as {newest[-1]!r}" if newest else ""
            raise UserError(f"checkpoint tag {tag!r} is not the name of a folder in {root}; name one{example}")
        why = problem(root, tag)
        if why:
            raise UserError(f"checkpoint {root / tag} is not complete: {why}")
        return tag
    tags = step_tags(root)
    if not tags:
        raise UserError(f"{root} holds no checkpoint (no step_* folder)")
    for candidate in reversed(tags):
        why = problem(root, candidate)
        if why is None:
            hint = _latest_hint(root)
            if hint != candidate:
                said = f"names {hint!r}" if hint else "is missing or empty"
                _warn(f"{root / 'latest'} {said}; using the newest complete checkpoint {candidate}")
            return candidate
        _warn(f"skipping damaged checkpoint {root / candidate}: {why}")
    raise UserError(
        f"{root} has checkpoint folders ({', '.join(tags)}) but none is complete; "
        "point checkpoint.resume at a complete one or set checkpoint.resume=none"
    )


def read_trainer_state(root: str | Path, tag: str) -> dict[str, Any]:
    path = Path(root) / tag / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {Path(root) / tag} is incomplete or unreadable ({err})") from None


def resolve_resume(resume: str, default_root: Path) -> tuple[Path, str] | None:
    """(checkpoint root, complete tag) to resume from, or None for a fresh start.

    auto: the newest complete tag under `default_root`; a fresh start only if it holds no step_*
    folder at all (never over checkpoints that exist but cannot be read). A path: a checkpoint
    folder (its newest complete tag) or one tag folder (which must be complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        return (default_root, resolve_tag(default_root)) if step_tags(default_root) else None
    path = Path(resume)
    if step_tags(path) or (path / "latest").is_file():
        return path, resolve_tag(path)
    if path.is_dir() and (tag_step(path.name) is not None or (path / TRAINER_STATE).is_file()):
        return path.parent, resolve_tag(path.parent, path.name)
    raise UserError(
        f"checkpoint.resume={resume!r} is neither a checkpoint folder (with step_* folders) "
        f"nor a checkpoint tag folder (with {TRAINER_STATE})"
    )


def read_model_config(root: Path) -> dict[str, Any]:
    """`root/model_config.json` as a dict; UserError if it is missing or unreadable."""
    path = Path(root) / "model_config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"checkpoint folder {root} has no model_config.json (written beside the checkpoints by "
            "`pretrain`); restore it from a copy of the run"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({first_line(err)}); restore it from a copy of the run") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a model config (a JSON object)")
    return saved


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight's shape for a model config, computed on the meta device (nothing allocated)."""
    from ..config import RUNTIME_KEYS, MosaicBertConfig
    from ..model import MosaicBertForMaskedLM

    with torch.device("meta"):
        model = MosaicBertForMaskedLM(
            MosaicBertConfig.from_dict({k: v for k, v in config.items() if k not in RUNTIME_KEYS})
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_model_matches(root: Path, model_config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another model shape, before any engine is built: every
    weight's name and shape from the saved model_config.json must be the run's. A checkpoint
    folder with tags but without a readable model_config.json is refused too (its shape is unknown)."""
    path = root / "model_config.json"
    if not path.is_file() and not step_tags(root):
        return
    saved = read_model_config(root)
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "mlp_type",
        "glu_fused",
        "position_embedding_type",
    )
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs run {model_config.get(k)!r}"
        for k in keys
        if saved.get(k) != model_config.get(k)
    ]
    if not diff:
        try:
            ours, theirs = _shapes(model_config), _shapes(saved)
        except (TypeError, ValueError) as err:
            raise UserError(f"{path} is not a valid model config ({first_line(err)})") from None
        diff = [
            f"{k}: checkpoint {theirs.get(k)} vs run {ours.get(k)}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        ][:3]
    if diff:
        raise UserError(f"checkpoint {root} holds another model shape ({'; '.join(diff)})")


def guess_precision_path(tag_dir: Path) -> str | None:
    """DeepSpeed's optimizer path from the files of a checkpoint that did not record it: BF16_Optimizer
    writes bf16_zero_pp_rank_* files, the ZeRO optimizer zero_pp_rank_* (None: cannot tell)."""
    names = [p.name for p in Path(tag_dir).glob("*zero_pp_rank_*")]
    if any(n.startswith("bf16_zero_pp_rank_") for n in names):
        return "BF16_Optimizer"
    if any(n.startswith("zero_pp_rank_") for n in names):
        return "DeepSpeedZeroOptimizer"
    return None


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, root: Path, tag: str, trainer_state: dict[str, Any], rank: int) -> None:
    """All ranks call this. Each rank's files, then DeepSpeed's (which ends with a barrier), then a
    barrier, then rank 0 writes the completion marker and, last, `latest`."""
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_json(tag_dir / TRAINER_STATE, trainer_state)
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": trainer_state}, save_latest=False)
    _barrier()
    if rank == 0:
        mark_complete(root, tag, trainer_state.get("world_size"))
        atomic_write_text(root / "latest", tag)
    _barrier()


def mark_complete(root: Path, tag: str, world_size: int | None) -> None:
    atomic_write_json(root / tag / COMPLETE, {"tag": tag, "world_size": world_size, "files": _files(root / tag)})


def remove_incomplete(root: Path, tag: str) -> None:
    """Rank 0, after a failed save: remove the tag's folder if it never became complete."""
    if problem(root, tag) is not None and (root / tag).is_dir():
        shutil.rmtree(root / tag, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Rank 0: keep the newest `keep_last` complete tags; delete older tags (complete or left
    over from failed saves). The newest complete tag is never deleted."""
    if keep_last <= 0:
        return
    complete = complete_tags(root)
    keep = set(complete[-keep_last:])
    newest = tag_step(complete[-1]) if complete else None
    for tag in step_tags(root):
        if tag in keep or newest is None or (tag_step(tag) or 0) > newest:
            continue
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)


def to_universal(root: Path, tag: str) -> str:
    """Convert a tag to DeepSpeed's universal format (rank 0 only); returns the new tag."""
    from deepspeed.checkpoint import ds_to_universal

    out_tag = f"{tag}_universal"
    if problem(root, out_tag) is None:
        return out_tag
    shutil.rmtree(root / out_tag, ignore_errors=True)  # an interrupted conversion of ours
    tmp = root / f"{out_tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(
        input_folder=str(root / tag),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    for extra in [TRAINER_STATE] + [p.name for p in (root / tag).glob("rng_rank*.pt")]:
        shutil.copy(root / tag / extra, tmp / extra)
    os.replace(tmp, root / out_tag)
    mark_complete(root, out_tag, None)
    return out_tag


def load_rng(root: Path, tag: str, rank: int, required: bool = True) -> bool:
    """Restore this rank's RNG. A missing file is an error when `required` (same world size: the
    resume would not be exact); after a world-size change new ranks have none."""
    path = root / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        if required:
            raise UserError(
                f"checkpoint {root / tag} has no {path.name}: rank {rank}'s random state is "
                "missing, so the resume would not be exact"
            )
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
