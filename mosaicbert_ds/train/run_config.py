"""A pretraining run as one YAML/JSON file, mirrored by dataclasses, with key=value overrides.

    mosaicbert-ds pretrain mosaicbert-base.yaml data.path=/data/c4 duration.steps=1000

A run file names a bundled recipe (`mosaicbert-base`, see mosaicbert_ds/recipes/) or a path.
Sections and keys are checked: an unknown key, a wrong type or an inconsistent value is a
UserError with one sentence, raised before any GPU time is spent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from ..config_files import apply_overrides, from_dict, read_tree
from ..errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelSection:
    preset: str | None = "base"
    """Name of a MosaicBertConfig preset: tiny, base, large, bert-base, bert-large ('' with init_from)."""
    overrides: dict = field(default_factory=dict)
    """MosaicBertConfig keys that change the preset (the ablation switches, dropout, ...)."""
    init_from: str = ""
    """A model folder to start from (import, export, or a raw BERT / MosaicBERT folder): step 0,
    fresh optimizer and schedule, the sizes from the source (a conflicting preset is an error; leave
    model.preset empty)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, about a third more compute)."""


@dataclass
class DataSection:
    path: str = ""
    """A dataset written by `mosaicbert-ds convert`: local folder or remote URL (s3://, gs://, ...)."""
    train_split: str = "train"
    eval_split: str = "val"
    mlm_probability: float = 0.3
    """Masking rate for training (0.30 MosaicBERT, 0.15 the BERT baseline)."""
    eval_mlm_probability: float = 0.15
    padded: bool = False
    """Feed padded batches (the BERT baseline) instead of the packed stream."""
    num_workers: int = 2
    """Loader worker processes per rank (0: load in the training process)."""
    remote_cache: str | None = None
    """Local cache folder for a remote dataset."""
    num_canonical_nodes: int | None = None
    """Fix this to resume on a different number of nodes with the same sample order."""
    verify_hashes: bool = True
    """Check each shard's xxh64 hash (written by convert) as it is decompressed; costs ~1% of I/O."""
    new_dataset: bool = False
    """On resume, accept a dataset other than the checkpoint's (another tokenizer or index): the
    weights and optimizer carry over, the data position restarts at its beginning."""


@dataclass
class BatchSection:
    global_batch: int = 4096
    """Samples per optimizer step over all ranks (train_batch_size)."""
    micro_batch: int = 128
    """Samples per rank per forward/backward; accumulation = global / (micro * ranks)."""
    micro_tokens: int | None = None
    """Instead of micro_batch: each rank splits its share of a step (global_batch / ranks samples)
    into micro batches of whole samples of at most this many tokens, so every micro step costs
    about the same whatever the lengths; the number of micro batches varies (docs/long_context.md)."""
    global_tokens: int | None = None
    """Instead of global_batch: the global batch is the multiple of 64 samples closest to this
    many tokens at the dataset's mean sample length (from its index), fixed when the run starts."""


@dataclass
class OptimizerSection:
    name: str = "adamw"
    """adamw (torch fused AdamW through DeepSpeed) or lamb (DeepSpeed FusedLamb, GPU only)."""
    lr: float = 5e-4
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5
    """Decoupled weight decay as in the paper: the decay per step at peak lr."""
    gradient_clipping: float = 1.0
    zero_stage: int | None = None
    """ZeRO stage: default 1 for AdamW (DeepSpeed's BF16_Optimizer with bf16), 0 for LAMB."""


@dataclass
class ScheduleSection:
    warmup_fraction: float = 0.06
    """Linear warmup over this fraction of the run's steps (the paper: 6% of 70,000)."""
    min_warmup_steps: int = 1000
    """The warmup's floor in optimizer steps, for runs too short for the fraction to give one (a
    time budget, a quickstart); it counts for at most half the run. 0: the fraction alone."""
    final_lr_ratio: float = 0.02
    """The linear decay ends at this fraction of the peak learning rate."""


@dataclass
class DurationSection:
    steps: int | None = None
    samples: int | None = None
    """Alternative to steps: the step count is samples / global batch, rounded up. Raising steps or
    samples on resume recomputes the learning-rate schedule for the new total."""
    wall_time: str | None = None
    """Stop, save and exit (code 4) once this much wall-clock time has passed since the start, e.g.
    3h50m under a 4-hour job limit: leave room for one log interval and one save."""
    train_seconds: float | None = None
    """Stop once this many seconds of training (eval and checkpoint time excluded) have passed,
    checked at log intervals; steps/samples then bound the run and seed the step estimate, and the
    lr schedule is re-fitted at each log interval to end at the budget (train.schedule)."""


@dataclass
class EvalSection:
    interval: int = 2000
    """Evaluate every this many optimizer steps (and at the end); 0 turns evaluation off."""
    batches: int = 100
    """Micro batches per rank per evaluation; 0 means the whole held-out split."""
    interval_seconds: float = 0.0
    """Also evaluate each time training seconds pass a multiple of this (checked at log intervals); 0: off."""
    plateau_steps: int = 1000
    """Warn once (never stop) when the held-out loss is still at the unigram plateau this many steps
    after warmup (train.plateau; needs a dataset whose index stores its unigram level); 0: off."""
    plateau_margin: float = 0.1
    """Nats below the unigram level that count as off the plateau."""


@dataclass
class CheckpointSection:
    interval: int = 3500
    """Save every this many optimizer steps (and at the end); 0 saves only at the end."""
    keep_last: int = 0
    """Delete older checkpoints beyond this many (0 keeps all)."""
    interval_seconds: float = 0.0
    """Also save each time training seconds pass a multiple of this (checked at log intervals); 0: off."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any), none, or a checkpoint folder."""


@dataclass
class DivergenceSection:
    max_nonfinite_steps: int = 3
    """Stop (exit 3) after this many consecutive optimizer steps with a NaN/inf loss or gradient
    norm; such steps are skipped by the optimizer and counted in optim/nonfinite_steps."""
    spike_factor: float = 0.0
    """Warn when an interval's loss exceeds this factor times its running mean (0: off)."""


@dataclass
class LogSection:
    interval: int = 50
    """Log every this many optimizer steps: the only points where the host waits for the GPU."""
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    duration: DurationSection = field(default_factory=DurationSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    divergence: DivergenceSection = field(default_factory=DivergenceSection)
    output_dir: str = "runs/mosaicbert"
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run's checkpoints, deleting that run's
    checkpoints, metrics and TensorBoard logs; without it such a start is refused."""
    seed: int = 17
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    deepspeed_config: str | None = None
    """A ds_configs/*.json file. Its batch, optimizer, ZeRO, clipping and precision keys decide; a
    value the user set (command line or own run file) that differs from it is refused."""
    peak_flops: float | None = None
    """Peak FLOP/s per GPU for MFU; default from the table in mosaicbert_ds.flops by GPU name."""
    compile: bool = False
    """torch.compile the model's layers."""
    cuda_graphs: bool | None = None
    """Replay each micro batch's forward + backward as a CUDA graph: the host issues one replay
    instead of thousands of kernels (mosaicbert_ds.train.graphed_engine_step). Empty (the default): wherever
    they apply (a CUDA GPU, packed batches, bf16 with ZeRO-1, no compile or gradient checkpointing);
    true: required; false: off."""

    def __post_init__(self) -> None:
        self.explicit: frozenset[str] = frozenset()
        """Dotted keys the user set (command line, or a run file that is not a bundled recipe)."""

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise UserError(message)

        need(
            bool(self.model.preset) or bool(self.model.init_from),
            "model.preset is empty: name a preset or set model.init_from",
        )
        need(bool(self.data.path), "data.path is not set: point it at a dataset written by `mosaicbert-ds convert`")
        need(self.data.num_workers >= 0, f"data.num_workers must be >= 0, got {self.data.num_workers}")
        need(
            0.0 < self.data.mlm_probability < 1.0,
            f"data.mlm_probability must be in (0, 1), got {self.data.mlm_probability}",
        )
        need(0.0 < self.data.eval_mlm_probability < 1.0, "data.eval_mlm_probability must be in (0, 1)")
        need(self.batch.global_batch > 0 and self.batch.micro_batch > 0, "batch sizes must be positive")
        b = self.batch
        for key in ("micro_tokens", "global_tokens"):
            value = getattr(b, key)
            need(value is None or value > 0, f"batch.{key} must be positive, got {value}")
        for tokens, samples in (("micro_tokens", "micro_batch"), ("global_tokens", "global_batch")):
            need(
                getattr(b, tokens) is None or f"batch.{samples}" not in self.explicit,
                f"batch.{tokens} and batch.{samples} both set the same size: set one of them",
            )
        need(
            b.micro_tokens is not None or b.global_tokens is not None or b.global_batch % b.micro_batch == 0,
            f"batch.global_batch ({self.batch.global_batch}) is not a multiple of batch.micro_batch "
            f"({self.batch.micro_batch})",
        )
        need(
            self.optimizer.name in ("adamw", "lamb"),
            f"optimizer.name must be adamw or lamb, got {self.optimizer.name!r}",
        )
        need(self.optimizer.lr > 0, "optimizer.lr must be positive")
        need(len(self.optimizer.betas) == 2, "optimizer.betas must be two numbers")
        need(self.optimizer.zero_stage in (None, 0, 1, 2), "optimizer.zero_stage must be 0, 1 or 2")
        need(0.0 <= self.schedule.warmup_fraction < 1.0, "schedule.warmup_fraction must be in [0, 1)")
        need(0.0 <= self.schedule.final_lr_ratio <= 1.0, "schedule.final_lr_ratio must be in [0, 1]")
        need(self.schedule.min_warmup_steps >= 0, "schedule.min_warmup_steps must be >= 0")
        need(self.eval.plateau_margin >= 0, "eval.plateau_margin must be >= 0")
        need(
            (self.duration.steps is None) != (self.duration.samples is None),
            "set exactly one of duration.steps and duration.samples",
        )
        need((self.duration.steps or self.duration.samples or 0) > 0, "the duration must be positive")
        need(
            self.duration.train_seconds is None or self.duration.train_seconds > 0,
            "duration.train_seconds must be positive",
        )
        need(
            self.eval.interval_seconds >= 0 and self.checkpoint.interval_seconds >= 0,
            "eval.interval_seconds and checkpoint.interval_seconds must be >= 0",
        )
        need(
            self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}"
        )
        for name in (
            "eval.interval",
            "eval.batches",
            "eval.plateau_steps",
            "checkpoint.interval",
            "checkpoint.keep_last",
        ):
            section, key = name.split(".")
            need(getattr(getattr(self, section), key) >= 0, f"{name} must be >= 0")
        need(self.log.interval > 0, "log.interval must be positive")
        need(self.divergence.max_nonfinite_steps > 0, "divergence.max_nonfinite_steps must be positive")
        need(
            self.divergence.spike_factor == 0 or self.divergence.spike_factor > 1,
            "divergence.spike_factor must be 0 (off) or above 1",
        )
        if self.duration.wall_time is not None:
            from .stops import parse_duration

            try:
                need(parse_duration(self.duration.wall_time) > 0, "duration.wall_time must be positive")
            except ValueError as err:
                raise UserError(f"duration.wall_time: {err}") from None
        if self.cuda_graphs:
            need(not self.data.padded, "cuda_graphs needs packed batches (data.padded: false)")
            need(not self.compile, "cuda_graphs and compile are exclusive: pick one")
            need(self.precision != "fp32", "cuda_graphs runs the bf16 path: precision must be auto or bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = frozenset(name for name, hint in get_type_hints(RunConfig).items() if dataclasses.is_dataclass(hint))


def check_model_config(cfg: RunConfig) -> None:
    """Build the model config once (with a stand-in vocabulary unless overridden), so that an unknown
    preset, an unknown override or an inconsistent size is one line before the data is opened."""
    from ..config import MosaicBertConfig

    if cfg.model.init_from and not cfg.model.preset:
        return  # the sizes come from the source, checked when it is read
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", 1024)
    try:
        MosaicBertConfig.from_name(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = (
            "model.preset"
            if message.startswith("unknown model preset")
            else "model.overrides"
            if cfg.model.overrides
            else "model"
        )
        raise UserError(f"{where}: {message}") from None


def _leaf_keys(tree: dict[str, Any]) -> set[str]:
    """Dotted names of the values in a run-file tree: `section.key` inside the sections, the key
    itself at the top level (a mapping such as model.overrides counts as one value)."""
    keys = set()
    for key, value in tree.items():
        if key in _SECTIONS and isinstance(value, dict):
            keys |= {f"{key}.{inner}" for inner in value}
        else:
            keys.add(str(key))
    return keys


_ALTERNATIVES = {"duration.steps": "samples", "duration.samples": "steps"}


def resolve_run_file(name_or_path: str) -> Path:
    """A path, or the name of a bundled recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise UserError(f"run file {name_or_path!r} not found (bundled recipes: {known})")


def load_run_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run file, apply key=value overrides, check everything."""
    path = resolve_run_file(name_or_path)
    tree = read_tree(path, "run file")
    overridden = apply_overrides(tree, overrides, _ALTERNATIVES)
    cfg = from_dict(RunConfig, tree)
    from_file = set() if path.resolve().parent == RECIPES_DIR.resolve() else _leaf_keys(tree)
    cfg.explicit = frozenset(from_file | overridden)
    cfg.validate()
    check_model_config(cfg)
    return cfg
