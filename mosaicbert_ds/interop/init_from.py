"""`model.init_from: PATH` in a run file: pretraining starts from existing weights.

PATH is a model folder of any layout `read_model_folder` reads (an import, an export, or a raw
BERT / authors' MosaicBERT folder, converted on the fly). The architecture comes from PATH; the
run file may still set what does not change the weights (dropout, unpad, low_precision_layernorm,
attention_impl, fused_ops, ...). A preset or an override that names another architecture is an error.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ARCHITECTURE_KEYS, MosaicBertConfig
from ..errors import UserError
from .folder import POOLER, read_model_folder

# Beyond the sizes, these change which weights exist.
_STRUCTURE_KEYS = (*ARCHITECTURE_KEYS, "glu_fused", "pad_vocab_size_multiple")


def config_and_weights(
    init_from: str, preset: str, overrides: dict[str, Any]
) -> tuple[MosaicBertConfig, dict[str, torch.Tensor]]:
    """The model config (source architecture + allowed overrides) and the MaskedLM state dict to load."""
    src = read_model_folder(init_from)
    base = src.config.to_dict()
    if preset:
        try:
            preset_cfg = MosaicBertConfig.from_name(preset, vocab_size=src.config.vocab_size).to_dict()
        except ValueError as err:
            raise UserError(str(err)) from None
        for key in ARCHITECTURE_KEYS:
            if key != "vocab_size" and preset_cfg.get(key) != base.get(key):
                raise UserError(
                    f"model.preset {preset!r} conflicts with model.init_from {init_from}: "
                    f"{key} is {preset_cfg.get(key)!r} there but {base.get(key)!r} in the source; "
                    f"leave model.preset empty (model.preset=) to take the source's architecture"
                )
    for key, value in overrides.items():
        if key in _STRUCTURE_KEYS and value != base.get(key):
            raise UserError(
                f"model.overrides.{key}={value!r} conflicts with model.init_from {init_from} "
                f"({key} is {base.get(key)!r} there); the sizes come from the source"
            )
    try:
        config = MosaicBertConfig(**{**base, **overrides})
    except (TypeError, ValueError) as err:
        raise UserError(f"model.overrides: {err}") from None
    return config, {k: v for k, v in src.state.items() if k not in POOLER}
