"""`mosaicbert-ds export SOURCE OUT [--layout L]`: a model folder that loads anywhere.

SOURCE is a training checkpoint (a run folder, its checkpoints/ folder, with --tag for one tag)
or a model folder (an import or an earlier export). The weights are DeepSpeed's fp32 master
copy (ZeRO shards merged by deepspeed.utils.zero_to_fp32), not the bf16 working copy.

--layout mosaicbert-ds (default): model.safetensors, config.json with `auto_map`, the tokenizer,
and this package's modeling files (config.py, model.py, attention.py, ops.py, padding.py, batch.py), so
the folder loads with transformers alone:
    AutoModelForMaskedLM.from_pretrained(OUT, trust_remote_code=True)   # also AutoModel, ...
and, where mosaicbert_ds is imported, without trust_remote_code. There the Triton kernels are
used on CUDA; the copied files use them only if mosaicbert_ds.kernels is importable and
otherwise run the exact PyTorch path.
--layout hf-bert: transformers' BertForMaskedLM (bert-base-style models only).
--layout mosaicbert-hub: the paper authors' MosaicBERT layout (mosaicml/mosaic-bert-base).

The config holds the architecture only: attention_impl and fused_ops are chosen where the
model runs. OUT is written beside itself and swapped in whole; it is never the source, and an
existing OUT is replaced only if it is an earlier export. Files are world-readable.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from ..config import RUNTIME_KEYS, MosaicBertConfig
from ..errors import UserError
from ..interop.folder import (
    OURS,
    ConvertedModel,
    copy_tokenizer,
    read_model_folder,
    record_tokenizer_class,
    write_model_folder,
)
from ..interop.layouts import LAYOUTS
from ..outputs import output_folder
from .checkpoint import latest_tag

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODELING_FILES = ("config.py", "model.py", "attention.py", "ops.py", "padding.py", "batch.py")
AUTO_MAP = {
    "AutoConfig": "config.MosaicBertConfig",
    "AutoModel": "model.MosaicBertModel",
    "AutoModelForMaskedLM": "model.MosaicBertForMaskedLM",
    "AutoModelForSequenceClassification": "model.MosaicBertForSequenceClassification",
    "AutoModelForTokenClassification": "model.MosaicBertForTokenClassification",
    "AutoModelForQuestionAnswering": "model.MosaicBertForQuestionAnswering",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds export runs/base runs/base/hf\n"
        "    mosaicbert-ds export runs/base/checkpoints runs/base/hf-step1000 --tag step_0001000"
    )
    parser.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or a model folder")
    parser.add_argument("out", help="output folder for the transformers model")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_0001000 (default: latest)")
    parser.add_argument(
        "--layout",
        default=OURS,
        choices=[OURS, *LAYOUTS],
        help="weight names and config of the output (default: %(default)s)",
    )


def _bf16_optimizer_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint (bf16 training; DeepSpeed's
    zero_to_fp32 does not read these). Each rank saves its flat partition of every parameter group;
    concatenated in rank order they are the group's parameters back to back (padding at the end),
    in the order and shapes that the model-states file records in `param_shapes`."""

    def rank_of(path: Path) -> int:
        return int(path.name.split("_pp_rank_")[1].split("_")[0])

    files = sorted((root / tag).glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    if [rank_of(f) for f in files] != list(range(len(files))):
        raise UserError(f"checkpoint {root / tag} lacks some ranks' optimizer files")
    model_states = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    partitions = [
        torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        for f in files
    ]
    state: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([parts[g].float() for parts in partitions])
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            state[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
        if offset > flat.numel():
            raise UserError(f"checkpoint {root / tag}: parameter group {g} is shorter than its parameters")
    for name, target in model_states.get("shared_params", {}).items():
        state[name] = state[target]
    for name in model_states.get("buffer_names", []):
        state[name] = model_states["module"][name].float()
    return state


def _fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if list((root / tag).glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return _bf16_optimizer_state_dict(root, tag)
    if list((root / tag).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    # ZeRO stage 0: the module in the model-states file is the full (fp32) model.
    states = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _from_checkpoint(root: Path, tag: str | None, shown: str) -> tuple[ConvertedModel, Path | None]:
    tag = tag or latest_tag(root)
    if tag is None or not (root / tag).is_dir():
        raise UserError(f"{shown} holds no finished checkpoint (no 'latest' file or tag {tag!r})")
    config_path = root / "model_config.json"
    if not config_path.is_file():
        raise UserError(f"{root} has no model_config.json; is it a mosaicbert-ds checkpoint folder?")
    cfg = json.loads(config_path.read_text())
    config = MosaicBertConfig.from_dict({k: v for k, v in cfg.items() if k not in RUNTIME_KEYS})
    from ..model import MosaicBertForMaskedLM

    expected = MosaicBertForMaskedLM(config).state_dict()
    state = _fp32_state_dict(root, tag)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {root / tag} does not match its model_config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else None
    return ConvertedModel(config, state, OURS, root / tag), tokenizer


def load_source(source: str | Path, tag: str | None = None) -> tuple[ConvertedModel, Path | None]:
    """The model in `source` (a checkpoint or a model folder) and the folder holding its tokenizer."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source} does not exist")
    if (path / "checkpoints" / "latest").is_file():
        return _from_checkpoint(path / "checkpoints", tag, str(source))
    if (path / "latest").is_file() or (path / "model_config.json").is_file():
        return _from_checkpoint(path, tag, str(source))
    if (path / "config.json").is_file():
        if tag:
            raise UserError(f"--tag applies to training checkpoints; {source} is a model folder")
        return read_model_folder(path), path
    raise UserError(f"{source} is neither a training checkpoint (latest) nor a model folder (config.json)")


def _write_tokenizer(tokenizer: Path, dest: Path) -> None:
    # a checkpoint's tokenizer folder saved some other way: let transformers rewrite it
    if not copy_tokenizer(tokenizer, dest) and not (tokenizer / "config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(dest))


def write_loadable_folder(model: ConvertedModel, dest: Path) -> None:
    """This project's layout plus the modeling files and auto_map that make it self-contained."""
    write_model_folder(model, dest, OURS)
    for name in MODELING_FILES:
        shutil.copyfile(PACKAGE_DIR / name, dest / name)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["auto_map"] = AUTO_MAP
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tag: str | None = None, layout: str = OURS) -> Path:
    """Write `out_dir` from a trainer checkpoint or a model folder; returns out_dir."""
    if layout != OURS and layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join([OURS, *LAYOUTS])}")
    model, tokenizer = load_source(checkpoint, tag)
    if layout != OURS:
        LAYOUTS[layout].check_exportable(model.config)  # before anything is written
    out = Path(out_dir)
    with output_folder(out, kind="export", sources=[checkpoint]) as tmp:
        if layout == OURS:
            write_loadable_folder(model, tmp)
        else:
            write_model_folder(model, tmp, layout)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
            record_tokenizer_class(tmp)
    return out


def main(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, args.tag, args.layout)
    print(f"exported {args.checkpoint} -> {out} (layout {args.layout})")
    return 0
