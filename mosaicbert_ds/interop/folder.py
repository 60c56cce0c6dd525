"""Reading a model folder in any known layout, and writing one in any layout.

A folder is config.json plus model.safetensors (or model.safetensors.index.json shards, or
pytorch_model.bin). The layout is recognised from the state dict's keys; config.json only
supplies what the weights cannot (heads, dropout, eps). The converted state dict must fill
MosaicBertForMaskedLM exactly: every key present, none left over, every shape right.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RUNTIME_KEYS, MosaicBertConfig
from ..errors import UserError, first_line
from .layouts import LAYOUTS, KeyPool, Tensors

OURS = "mosaicbert-ds"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
POOLER = ("bert.pooler.weight", "bert.pooler.bias")


@dataclass
class ConvertedModel:
    """A model in this project's names: its config, its MosaicBertForMaskedLM state dict (plus
    the pooler, when the source had one), where it came from and what was filled in."""

    config: MosaicBertConfig
    state: Tensors
    layout: str
    source: Path
    notes: list[str] = field(default_factory=list)

    def model(self) -> torch.nn.Module:
        """The MosaicBertForMaskedLM holding these weights (strictly loaded)."""
        from ..model import MosaicBertForMaskedLM

        model = MosaicBertForMaskedLM(self.config)
        model.load_state_dict({k: v for k, v in self.state.items() if k not in POOLER}, strict=True)
        return model.eval()


def weight_files(path: Path) -> list[Path]:
    """The files holding a folder's weights: model.safetensors, the shards its index names, or
    pytorch_model.bin. UserError if there are none or the index is unreadable."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index} is not a readable safetensors index ({first_line(err)})") from None
        return [path / name for name in names]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise UserError(f"{path} has no weights (model.safetensors, its index, or pytorch_model.bin)")


def _damaged(file: Path, err: BaseException) -> UserError:
    return UserError(f"{file} cannot be read: it is truncated or not a weights file ({first_line(err)})")


def check_weight_files(path: Path) -> None:
    """Every weights file of the folder opens and is as long as its header says (safetensors: the
    header only, nothing else is read); UserError naming the first that is not."""
    from safetensors import safe_open

    for file in weight_files(path):
        if not file.is_file():
            raise UserError(f"{file} is missing (named in {path / 'model.safetensors.index.json'})")
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
            raise _damaged(file, err) from None


def _load_state(path: Path) -> Tensors:
    from safetensors.torch import load_file

    state: Tensors = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                state.update(load_file(file))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:  # SafetensorError, pickle and zip errors, OSError: damaged weights
            raise _damaged(file, err) from None
    return state


def _with_prefix(state: Tensors) -> Tensors:
    """A bare BertModel's keys (embeddings., encoder., pooler.) under the `bert.` prefix."""
    if any(k.startswith("bert.") for k in state):
        return state
    return {f"bert.{k}": v for k, v in state.items()}


def _check_against_model(
    config: MosaicBertConfig, state: Tensors, where: str, notes: list[str], fill_head: bool
) -> Tensors:
    """Every key and shape of MosaicBertForMaskedLM(config); the head from a fresh init if allowed."""
    from ..model import MosaicBertForMaskedLM

    torch.manual_seed(0)
    expected = MosaicBertForMaskedLM(config).state_dict()
    out = dict(state)
    if fill_head and not any(k.startswith("head.") for k in state):
        out.update({k: v.clone() for k, v in expected.items() if k.startswith("head.")})
    for key, ref in expected.items():
        if key not in out:
            raise UserError(f"{where}: missing weight for {key!r}")
        if tuple(out[key].shape) != tuple(ref.shape):
            raise UserError(f"{where}: {key} has shape {tuple(out[key].shape)} but the config needs {tuple(ref.shape)}")
    for key in out:
        if key not in expected and key not in POOLER:
            raise UserError(f"{where}: unexpected weight {key!r}")
    for key in POOLER:
        if key in out and tuple(out[key].shape[-1:]) != (config.hidden_size,):
            raise UserError(f"{where}: {key} has shape {tuple(out[key].shape)}")
    return {k: v.float().contiguous() for k, v in out.items()}


def detect_layout(path: str | Path) -> str | None:
    """The layout of a folder's weights, or None when it is not a model folder this reads."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError:
        return None
    if cfg.get("model_type") == MosaicBertConfig.model_type:
        return OURS
    try:
        keys = set(_with_prefix(_load_state(path)))
    except UserError:
        return None
    return next((name for name, layout in LAYOUTS.items() if layout.detect(keys)), None)


def read_model_folder(path: str | Path) -> ConvertedModel:
    """`path` converted to this project's names; UserError for anything that does not fit exactly."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise UserError(f"{path}/config.json is not JSON ({err})") from None
    where = str(path)
    if cfg.get("model_type") == MosaicBertConfig.model_type:
        try:
            config = MosaicBertConfig.from_dict({k: v for k, v in cfg.items() if k not in RUNTIME_KEYS})
        except (TypeError, ValueError) as err:
            raise UserError(f"{path}/config.json: {err}") from None
        state = _check_against_model(config, _load_state(path), where, [], fill_head=False)
        return ConvertedModel(config, state, OURS, path)
    state = _with_prefix(_load_state(path))
    keys = set(state)
    layout_name = next((name for name, layout in LAYOUTS.items() if layout.detect(keys)), None)
    if layout_name is None:
        arch = cfg.get("architectures") or cfg.get("model_type") or "unknown"
        raise UserError(
            f"{path} holds neither BERT nor MosaicBERT weights ({arch}; no "
            f"'bert.encoder.layer.0.attention.self.query.weight' or '...self.Wqkv.weight'); "
            f"layouts that import: {', '.join(LAYOUTS)}, {OURS}"
        )
    if cfg.get("model_type", "bert") != "bert":
        raise UserError(f"{path}/config.json says model_type {cfg.get('model_type')!r}, not 'bert'")
    layout = LAYOUTS[layout_name]
    try:
        config = MosaicBertConfig(**layout.config_to_ours(cfg))
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}/config.json: {err}") from None
    if config.vocab_size != int(cfg.get("vocab_size", config.vocab_size)):
        raise UserError(f"{path}: vocab_size {cfg['vocab_size']} changed to {config.vocab_size} on import")
    notes: list[str] = []
    pool = KeyPool(state, where)
    ours = layout.to_ours(pool, config.num_hidden_layers, notes)
    pool.finish()
    state = _check_against_model(config, ours, where, notes, fill_head=True)
    return ConvertedModel(config, state, layout_name, path, notes)


def _save_safetensors(state: Tensors, path: Path) -> None:
    from safetensors.torch import save_file

    # tied tensors (decoder = word embeddings) are written as separate copies, as BERT's files hold them
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def copy_tokenizer(src: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files found in `src` (if any) into `dest`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dest / name)
            copied.append(name)
    return copied


def record_tokenizer_class(dest: Path) -> None:
    """Name the folder's tokenizer class in its config.json, as transformers' own saves do, so
    that `pipeline(task, model=dest)` loads the tokenizer also for a remote-code model (older
    transformers look the tokenizer up by config class, which fails for one not built in)."""
    tok_cfg, cfg_path = dest / "tokenizer_config.json", dest / "config.json"
    if not (tok_cfg.is_file() and cfg_path.is_file()):
        return
    name = json.loads(tok_cfg.read_text()).get("tokenizer_class")
    cfg = json.loads(cfg_path.read_text())
    if name and not cfg.get("tokenizer_class"):
        cfg["tokenizer_class"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_model_folder(
    model: ConvertedModel, dest: Path, layout: str = OURS, tokenizer_from: Path | None = None
) -> None:
    """Write `model` into the (already created, empty) folder `dest` in `layout`."""
    if layout == OURS:
        d = model.config.to_dict()
        for k in RUNTIME_KEYS:
            d.pop(k, None)
        d["architectures"] = ["MosaicBertForMaskedLM"]
        (dest / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        _save_safetensors(model.state, dest / "model.safetensors")
    else:
        if layout not in LAYOUTS:
            raise UserError(f"unknown layout {layout!r}; choose one of {', '.join([OURS, *LAYOUTS])}")
        target = LAYOUTS[layout]
        cfg = target.config_from_ours(model.config)
        (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _save_safetensors(target.from_ours(model.state, model.config), dest / "model.safetensors")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, dest)
        record_tokenizer_class(dest)
