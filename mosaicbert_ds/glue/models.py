"""What finetuning starts from: a transformers folder (MosaicBERT or plain BERT) or a trainer checkpoint.

A trainer (DeepSpeed) checkpoint -- the run folder, its checkpoints/ folder with DeepSpeed's
`latest` file, or one tag folder such as checkpoints/step_0003500 -- is exported once with
mosaicbert_ds.train.export.export_checkpoint into the output folder; the export is then
loaded like any transformers folder. The tokenizer comes from the model's folder unless
--tokenizer names another, and must match the model's vocabulary.

A folder in the paper authors' MosaicBERT layout (mosaicml/mosaic-bert-base) is imported once
(mosaicbert_ds.interop) into the output folder and finetuned as this project's MosaicBERT.

Each task gets `AutoModelForSequenceClassification` with its number of labels; a head whose
shape differs from the saved one (the MNLI head when RTE starts from MNLI) is re-initialised.
Every other weight must come from the folder: a model that would start with part of its encoder
random (another architecture's names, a partial state dict) is refused with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import mosaicbert_ds  # noqa: F401  (registers MosaicBERT with the Auto classes)
from mosaicbert_ds.model import MosaicBertPreTrainedModel

from ..errors import UserError
from .tasks import Task

EXPORT_DIR = "pretrained"
IMPORT_DIR = "imported"
# Weights the classifier may lack (it adds them) or leave unused (the pretraining head).
_NEW_OK = re.compile(r"^(classifier|bert\.pooler)\.")
_UNUSED_OK = re.compile(r"^(cls|head)\.")
TRAINER_STATE = "trainer_state.json"


def trainer_checkpoint(path: Path) -> tuple[Path, str | None] | None:
    """(checkpoints root, tag or None for DeepSpeed's latest) when `path` is a trainer checkpoint:
    a run folder, its checkpoints/ folder (with `latest`), or one tag folder inside it."""
    path = Path(path)
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints", None
    if (path / "latest").is_file():
        return path, None
    if (path / TRAINER_STATE).is_file() and (path.parent / "latest").is_file():
        return path.parent, path.name
    return None


def is_trainer_checkpoint(path: Path) -> bool:
    return trainer_checkpoint(path) is not None


def trainer_state(path: Path | None) -> dict[str, Any]:
    """The trainer's record of a checkpoint (trainer_state.json: step, train_seconds, ...), or {}
    for a folder that is not a trainer checkpoint or whose record cannot be read."""
    found = trainer_checkpoint(path) if path is not None else None
    if found is None:
        return {}
    root, tag = found
    try:
        tag = tag or (root / "latest").read_text(encoding="utf-8").strip()
        state = json.loads((root / tag / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def resolve_model_dir(path: Path, out_dir: Path, is_main: bool = True) -> Path:
    """The transformers folder to load: `path` itself, or its export (made once, atomically)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    found = trainer_checkpoint(path)
    if found is None:
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is neither a transformers folder (config.json) nor a trainer checkpoint (latest)")
        from mosaicbert_ds.interop.folder import detect_layout

        if detect_layout(path) != "mosaicbert-hub":
            return path
        target = Path(out_dir) / IMPORT_DIR  # transformers' BERT would load it with most weights random
        if is_main and not (target / "config.json").is_file():
            from mosaicbert_ds.interop.import_command import import_folder

            import_folder(path, target)
        return target
    target = Path(out_dir) / EXPORT_DIR
    if is_main and not (target / "config.json").is_file():
        try:
            from mosaicbert_ds.train.export import export_checkpoint
        except ImportError as err:
            raise UserError(f"{path} is a trainer checkpoint but the exporter is unavailable ({err})") from None
        root, tag = found
        export_checkpoint(root, target, tag=tag)  # written beside `target`, then swapped in whole
    return target


def load_tokenizer(path: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise UserError(
            f"could not load a tokenizer from {path} ({type(err).__name__}); pass --tokenizer DIR"
        ) from None


def check_vocab(model_dir: Path, tokenizer: Any) -> None:
    """The model's embedding rows must be the tokenizer's vocabulary, rounded up to the model's
    pad_vocab_size_multiple (64 for MosaicBERT, 1 for BERT): else they are different vocabularies."""
    config = AutoConfig.from_pretrained(str(model_dir))
    n_tok, n_model = len(tokenizer), int(config.vocab_size)
    multiple = max(1, int(getattr(config, "pad_vocab_size_multiple", 1) or 1))
    if not n_tok <= n_model < n_tok + multiple:
        raise UserError(
            f"vocabulary mismatch: the model in {model_dir} has {n_model} token embeddings "
            f"but its tokenizer has {len(tokenizer)} tokens"
        )


def check_max_length(model_dir: Path, max_length: int) -> None:
    """Learned position embeddings must cover max_length; ALiBi models (this project's and the
    authors' MosaicBERT, which has alibi_starting_size) take any length."""
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "position_embedding_type", None) == "alibi" or hasattr(config, "alibi_starting_size"):
        return
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > int(positions):
        raise UserError(
            f"max_length {max_length} is longer than the {positions} learned position embeddings of the model "
            f"in {model_dir}; use --max-length {positions} or less"
        )


def load_for_task(model_dir: Path, task: Task) -> torch.nn.Module:
    """An fp32 sequence classifier for `task`; MSE loss when num_labels is 1, cross-entropy otherwise."""
    config = AutoConfig.from_pretrained(str(model_dir))
    if config.num_labels != task.num_labels:
        config.num_labels = task.num_labels  # also resets id2label/label2id
    config.problem_type = "regression" if task.regression else "single_label_classification"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new or re-initialised head is expected, not news
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )  # in the checkpoint's dtype (no dtype argument: its name differs across transformers 4 and 5)
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(model_dir, info)
    return model.float()


def check_loading_info(model_dir: Path, info: dict[str, Any]) -> None:
    """Refuse a model whose encoder did not come entirely from `model_dir`."""
    missing = [k for k in info.get("missing_keys", []) if not _NEW_OK.match(k)]
    unused = [k for k in info.get("unexpected_keys", []) if not _UNUSED_OK.match(k)]
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])]
    mismatched = [k for k in mismatched if not str(k).startswith("classifier.")]
    for what, keys in (
        ("has no weight for", missing),
        ("holds weights the model does not use, e.g.", unused),
        ("holds weights of another shape for", mismatched),
    ):
        if keys:
            raise UserError(
                f"{model_dir} does not fit the chosen model: it {what} {sorted(keys)[0]!r} "
                f"({len(keys)} in all); convert it with `mosaicbert-ds import` or pick another model"
            )


def uses_packed_batches(model: torch.nn.Module) -> bool:
    """MosaicBERT takes the unpadded (cu_seqlens) form; anything else gets padded batches."""
    return isinstance(model, MosaicBertPreTrainedModel)
