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
model runs. OUT is written beside itself and swapped in whole; it is never the source, nor a
run folder, dataset or checkpoint (or inside one: mosaicbert_ds.folders), and an existing OUT is
replaced only if it is an earlier export holding nothing the user added. One export at a time
writes OUT (a lock beside it); leftovers of a killed export are removed by the next one. A
checkpoint is read only from a complete tag (train.checkpoint.resolve_tag). Files are world-readable.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from ..config import RUNTIME_KEYS, MosaicBertConfig
from ..errors import UserError, first_line
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
from .checkpoint import read_model_config, resolve_tag

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


def _from_checkpoint(root: Path, tag: str | None) -> tuple[ConvertedModel, Path | None]:
    """The fp32 model of a complete tag (`tag`, or the newest complete one: checkpoint.resolve_tag)."""
    tag = resolve_tag(root, tag)
    cfg = read_model_config(root)
    try:
        config = MosaicBertConfig.from_dict({k: v for k, v in cfg.items() if k not in RUNTIME_KEYS})
    except (TypeError, ValueError) as err:
        raise UserError(f"{root / 'model_config.json'} is not a valid model config ({first_line(err)})") from None
    from ..model import MosaicBertForMaskedLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MosaicBertForMaskedLM(config).state_dict().items()}
    try:
        state = _fp32_state_dict(root, tag)
    except UserError:
        raise
    except Exception as err:  # torch.load, zip and pickle errors: a file changed after its save completed
        raise UserError(f"checkpoint {root / tag} cannot be read ({first_line(err)})") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {root / tag} does not match its model_config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"checkpoint {root / tag} does not match its model_config.json "
                f"({name} has shape {tuple(state[name].shape)}, the config needs {shape})"
            )
    tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else None
    return ConvertedModel(config, state, OURS, root / tag), tokenizer


def load_source(source: str | Path, tag: str | None = None) -> tuple[ConvertedModel, Path | None]:
    """The model in `source` (a checkpoint or a model folder) and the folder holding its tokenizer."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source} does not exist")
    if _is_checkpoint_folder(path / "checkpoints"):
        return _from_checkpoint(path / "checkpoints", tag)
    if _is_checkpoint_folder(path):
        return _from_checkpoint(path, tag)
    if (path / "config.json").is_file():
        if tag:
            raise UserError(f"--tag applies to training checkpoints; {source} is a model folder")
        return read_model_folder(path), path
    raise UserError(f"{source} is neither a training checkpoint (latest) nor a model folder (config.json)")


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / "latest").is_file() or (path / "model_config.json").is_file()


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
    """Write `out_dir` from a trainer checkpoint or a model folder; returns out_dir. The output
    folder is checked and locked (outputs.output_folder) before the weights are read."""
    if layout != OURS and layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join([OURS, *LAYOUTS])}")
    out = Path(out_dir)
    with output_folder(out, kind="export", sources=[checkpoint]) as tmp:
        model, tokenizer = load_source(checkpoint, tag)
        if layout != OURS:
            LAYOUTS[layout].check_exportable(model.config)
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
