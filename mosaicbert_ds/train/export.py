"""`mosaicbert-ds export CHECKPOINT OUT`: a training checkpoint as a transformers folder.

The weights are DeepSpeed's fp32 master copy (ZeRO shards merged by deepspeed.utils.zero_to_fp32),
not the bf16 working copy. The folder holds model.safetensors, config.json and the tokenizer, and
loads with `AutoModelForMaskedLM.from_pretrained(OUT)` after `import mosaicbert_ds`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..config import MosaicBertConfig
from ..model import MosaicBertForMaskedLM
from .checkpoint import latest_tag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "    mosaicbert-ds export runs/base/checkpoints runs/base/hf\n"
                     "    mosaicbert-ds export runs/base/checkpoints runs/base/hf-step1000 --tag step_0001000")
    parser.add_argument("checkpoint", help="a run's checkpoints/ folder (or the run folder)")
    parser.add_argument("out", help="output folder for the transformers model")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_0001000 (default: latest)")


def _fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if list((root / tag).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    # ZeRO stage 0: the module in the model-states file is the full (fp32) model.
    states = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write `out_dir` as a transformers folder from a trainer checkpoint; returns out_dir."""
    root = Path(checkpoint)
    if (root / "checkpoints" / "latest").is_file():
        root = root / "checkpoints"
    tag = tag or latest_tag(root)
    if tag is None or not (root / tag).is_dir():
        raise UserError(f"{checkpoint} holds no finished checkpoint (no 'latest' file or tag {tag!r})")
    config_path = root / "model_config.json"
    if not config_path.is_file():
        raise UserError(f"{root} has no model_config.json; is it a mosaicbert-ds checkpoint folder?")
    config = MosaicBertConfig.from_json_file(str(config_path))
    model = MosaicBertForMaskedLM(config)
    state = _fp32_state_dict(root, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {root / tag} does not match its model_config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if (root / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, args.tag)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
