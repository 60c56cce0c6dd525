"""The DeepSpeed side of a run: its config, resolved from one source, and the engine around the model.

A run's batch, optimizer and precision come from the run file, or from a `deepspeed_config` JSON
(ds_configs/, or the user's own). With a JSON, the JSON decides those keys; a key the user set
themselves (on the command line, or in their own run file, not a bundled recipe's default) must
agree with it, or the run is refused with one line naming the key and both values. The run
config is then updated to what the engine runs, so `run_config.json` records the truth and every
later check (CUDA graphs, the schedule) sees the values in use.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import MosaicBertConfig
from ..errors import UserError
from ..model import MosaicBertForMaskedLM
from . import token_batches
from .ds_config import build_ds_config, load_ds_config, precision_path
from .run_config import RunConfig
from .schedule import make_scheduler

_OPTIMIZER_NAMES = {"adamw": "adamw", "lamb": "lamb"}


def ds_values(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The run-file keys a DeepSpeed config decides, in the run file's terms (weight decay decoupled)."""
    opt = ds_config.get("optimizer", {})
    params = opt.get("params", {})
    lr = params.get("lr")
    values: dict[str, Any] = {
        "batch.global_batch": ds_config["train_batch_size"],
        "batch.micro_batch": ds_config["train_micro_batch_size_per_gpu"],
        "optimizer.name": _OPTIMIZER_NAMES.get(str(opt.get("type", "")).lower()),
        "optimizer.lr": lr,
        "optimizer.betas": tuple(float(b) for b in params["betas"]) if "betas" in params else None,
        "optimizer.eps": params.get("eps"),
        "optimizer.weight_decay": params["weight_decay"] * lr if "weight_decay" in params and lr else None,
        "optimizer.gradient_clipping": ds_config.get("gradient_clipping", 0.0),
        "optimizer.zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
    }
    bf16 = ds_config.get("bf16", {}).get("enabled") or ds_config.get("torch_autocast", {}).get("enabled")
    values["precision"] = "bf16" if bf16 else "fp32"
    return {k: v for k, v in values.items() if v is not None}


def _get(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node: Any = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)


def _same(key: str, ours: Any, theirs: Any) -> bool:
    if key == "precision" and ours == "auto":
        return True
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(ours, tuple) and isinstance(theirs, tuple):
        return len(ours) == len(theirs) and all(_same(key, a, b) for a, b in zip(ours, theirs))
    return ours == theirs


def resolve_ds_config(cfg: RunConfig, world: int, info: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """The DeepSpeed config for `world` ranks and the run's total optimizer steps; with a
    deepspeed_config, the run config is updated to the JSON's values (UserError on a conflict).
    Token-sized batches (batch.global_tokens, batch.micro_tokens: train.token_batches) read the
    dataset index (`info`, or read here)."""
    mean_tokens = None
    if cfg.batch.global_tokens or cfg.batch.micro_tokens:
        if info is None:
            from ..data import read_dataset_info

            info = read_dataset_info(cfg.data.path, cfg.data.remote_cache)
        mean_tokens = token_batches.mean_sample_tokens(info, cfg.data.train_split)
    if cfg.batch.global_tokens:
        if cfg.deepspeed_config:
            raise UserError(
                f"batch.global_tokens and {cfg.deepspeed_config}'s train_batch_size both set the global batch; "
                "drop one of the two"
            )
        cfg.batch.global_batch = token_batches.global_batch_for_tokens(cfg.batch.global_tokens, mean_tokens)
    if cfg.batch.micro_tokens:  # DeepSpeed's micro batch is the rank's whole share: check divisibility only
        cfg.batch.micro_batch = cfg.batch.global_batch // world if cfg.batch.global_batch % world == 0 else 1
    if cfg.deepspeed_config:
        ds_config = load_ds_config(cfg.deepspeed_config, world)
        for key, theirs in ds_values(ds_config).items():
            if key == "batch.micro_batch" and cfg.batch.micro_tokens:
                continue  # replaced by the token budget below
            ours = _get(cfg, key)
            if key in cfg.explicit and not _same(key, ours, theirs):
                raise UserError(
                    f"{key} is {ours!r} in the run, but {cfg.deepspeed_config} sets it to {theirs!r}"
                    f"{' (weight decay in the decoupled convention)' if 'weight_decay' in key else ''}; "
                    f"drop one of the two, or make them agree"
                )
            _set(cfg, key, theirs)
    else:
        o = cfg.optimizer
        ds_config = build_ds_config(
            global_batch=cfg.batch.global_batch,
            micro_batch=cfg.batch.micro_batch,
            world_size=world,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            optimizer=o.name,
            zero_stage=o.zero_stage,
            gradient_clipping=o.gradient_clipping,
            bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available()),
        )
    if cfg.batch.micro_tokens:
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        token_batches.token_micro_batches(ds_config, world, stage)
        cfg.batch.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    total_steps = cfg.duration.steps or math.ceil(cfg.duration.samples / ds_config["train_batch_size"])
    return ds_config, total_steps


def graphs_apply(cfg: RunConfig, ds_config: dict[str, Any]) -> str | None:
    """Why CUDA graphs cannot run this run (None when they can): they need a CUDA device, packed
    batches, DeepSpeed's BF16_Optimizer, and neither torch.compile nor gradient checkpointing."""
    if cfg.data.padded:
        return "it needs packed batches (data.padded: false)"
    if cfg.compile:
        return "compile and CUDA graphs are exclusive"
    if cfg.model.gradient_checkpointing:
        return "gradient checkpointing runs eagerly (its recomputation is not captured)"
    path = precision_path(ds_config)
    if path != "BF16_Optimizer":
        return f"it needs DeepSpeed's BF16_Optimizer (bf16, AdamW at ZeRO stage 1); this run uses {path}"
    if not torch.cuda.is_available():
        return "it needs a CUDA device"
    return None


def use_graphs(cfg: RunConfig, ds_config: dict[str, Any]) -> bool:
    """cuda_graphs: null (auto) uses them wherever they apply; true requires them; false never."""
    why = graphs_apply(cfg, ds_config)
    if cfg.cuda_graphs and why:
        raise UserError(f"cuda_graphs: true cannot run: {why}")
    return cfg.cuda_graphs is not False and why is None


def build_engine(
    model_config: MosaicBertConfig,
    ds_config: dict[str, Any],
    total_steps: int,
    warmup_fraction: float,
    final_lr_ratio: float,
    seed: int = 17,
    compile_layers: bool = False,
    batched_optimizer: bool = False,
    init_state: dict[str, torch.Tensor] | None = None,
    gradient_checkpointing: bool = False,
    min_warmup_steps: int = 0,
) -> tuple[Any, int]:
    """The DeepSpeed engine around a freshly initialised MosaicBertForMaskedLM, and its parameter count.

    On one rank the engine's gradient all-reduce is skipped (train.deepspeed_internals).
    batched_optimizer: BF16_Optimizer's per-parameter loops (gradient accumulation, gradient norm,
    clipping) replaced by foreach ops, and a non-finite step skipped on the device
    (train.deepspeed_internals; the same numbers)."""
    import deepspeed

    from .deepspeed_internals import check_version, prepare_engine

    check_version()
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = MosaicBertForMaskedLM(model_config)
    if init_state is not None:  # model.init_from: every weight from the source, checked at import
        model.load_state_dict(init_state, strict=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    if compile_layers:
        for layer in model.bert.layers:
            layer.compile(dynamic=True)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config,
        lr_scheduler=make_scheduler(total_steps, warmup_fraction, final_lr_ratio, min_warmup_steps),
    )
    prepare_engine(engine, batched_optimizer=batched_optimizer)
    return engine, n_params
