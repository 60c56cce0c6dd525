"""A finetune-glue run as dataclasses of sections, set by flags and `key=value` overrides.

    mosaicbert-ds finetune-glue MODEL --out runs/glue --tasks rte,mrpc --seeds 3 --hparam rte.lr=2e-5
    mosaicbert-ds finetune-glue MODEL --out runs/glue tasks.names=rte,mrpc tasks.seeds=3 hparams.rte.lr=2e-5

The two lines are the same run: each flag sets one key (`FLAGS`), and `key=value` overrides,
read and checked as pretraining's run files are (mosaicbert_ds.config_files), are applied after
the flags. `load_finetune_config` checks every value before anything is read or written; a
mistake is one UserError line.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config_files import apply_overrides, from_dict, set_dotted
from ..errors import UserError
from .tasks import TASKS, Hparams, Task, parse_seed_counts, parse_tasks
from .tasks import apply_overrides as apply_hparams


@dataclass
class TasksSection:
    names: str = "all"
    """Comma-separated GLUE tasks, or all; they run in GLUE's order, MNLI first."""
    seeds: int | str | None = None
    """Seeds per task: N, or TASK=N,... (default: 1 for MNLI, QNLI and QQP, 5 for the rest)."""
    first_seed: int = 42
    """Seed k of a task is first_seed + k."""
    mnli_start: bool = True
    """Start RTE, MRPC and STS-B from the MNLI-finetuned model (the paper's recipe); MNLI is
    then added to the tasks when it is not among them."""


@dataclass
class DataSection:
    dir: str | None = None
    """Local GLUE TSV or JSONL files (DIR/MNLI/train.tsv ...); empty: the hub's nyu-mll/glue."""
    limit_train: int | None = None
    """Use only the first N training examples of each task (smoke runs)."""
    limit_eval: int | None = None
    """Use only the first N examples of each dev split (smoke runs)."""


@dataclass
class RunSection:
    save_every: int = 2000
    """Save resumable state every this many steps (0: only at the end of a seed)."""
    eval_batch_size: int = 128
    device: str = "auto"
    """auto (CUDA when there is one), cpu or cuda."""
    progress: bool = True
    """tqdm progress bars on stderr (rank 0)."""
    cuda_graphs: bool | None = None
    """Replay each training step's forward + backward as a CUDA graph (glue.graphed_step: the same
    loss and gradients, the host issues one replay instead of thousands of kernels). true: on, for
    one CUDA device and one process with a MosaicBERT model the graphs can capture, refused
    otherwise; false: off. Empty (auto) is off for now: auto turns them on once the GPU test and
    the benchmark in docs/performance.md ("Finetuning") have been run."""


@dataclass
class FinetuneConfig:
    model: str = ""
    """A transformers folder (MosaicBERT, or BERT for the baseline) or a trainer checkpoint."""
    out: str = ""
    """The output folder; running again with the same one resumes."""
    tokenizer: str | None = None
    """A tokenizer folder (default: the model's)."""
    tasks: TasksSection = field(default_factory=TasksSection)
    data: DataSection = field(default_factory=DataSection)
    hparams: dict = field(default_factory=dict)
    """Changes to the paper's per-task recipe (tasks.Hparams): hparams.KEY=VALUE for every task,
    hparams.TASK.KEY=VALUE for one task, which wins over the value for every task."""
    run: RunSection = field(default_factory=RunSection)

    def task_list(self) -> list[Task]:
        """The tasks to run, in run order, MNLI added when a task starts from it."""
        tasks = parse_tasks(self.tasks.names)
        if self.tasks.mnli_start and any(t.from_mnli for t in tasks) and TASKS["mnli"] not in tasks:
            tasks = [TASKS["mnli"]] + tasks  # a dependency: trained (with its own seeds) and reported
        return tasks

    def seed_counts(self) -> dict[str, int]:
        return parse_seed_counts(self.tasks.seeds, self.task_list())

    def recipe(self) -> dict[str, Hparams]:
        """Every task's Hparams after `hparams`: the values for every task first, then each task's own."""
        every = [f"{key}={value}" for key, value in self.hparams.items() if not isinstance(value, dict)]
        own = [
            f"{task}.{key}={value}"
            for task, values in self.hparams.items()
            if isinstance(values, dict)
            for key, value in values.items()
        ]
        return apply_hparams(every + own)

    def validate(self) -> None:
        """UserError for the first value out of range. model and out are each run's own: finetune_glue
        checks them (pareto shares one FinetuneConfig between checkpoints)."""
        self.seed_counts()  # also checks the task names
        self.recipe()
        for key, flag, value, zero_ok in (
            ("run.save_every", "--save-every", self.run.save_every, True),
            ("run.eval_batch_size", "--eval-batch-size", self.run.eval_batch_size, False),
            ("data.limit_train", "--limit-train", self.data.limit_train, False),
            ("data.limit_eval", "--limit-eval", self.data.limit_eval, False),
        ):
            if value is not None and (value < 0 or (value == 0 and not zero_ok)):
                raise UserError(f"{key} ({flag}) must be {'>= 0' if zero_ok else 'positive'}, got {value}")
        if self.run.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"run.device must be auto, cpu or cuda, got {self.run.device!r}")
        if self.run.cuda_graphs and self.run.device == "cpu":
            raise UserError("run.cuda_graphs=true (--cuda-graphs) needs a CUDA device, not run.device=cpu")

    def use_cuda_graphs(self, cuda_available: bool, world_size: int) -> bool:
        """Whether the training steps run as CUDA graphs on this machine: run.cuda_graphs decided
        against the CUDA device and the number of processes (auto: off). UserError, one line,
        where true cannot run."""
        if not self.run.cuda_graphs:
            return False
        if world_size > 1:
            raise UserError(
                f"run.cuda_graphs=true (--cuda-graphs) runs in one process; this run has {world_size} (DDP "
                "finetuning stays eager)"
            )
        if not cuda_available or self.run.device == "cpu":
            raise UserError("run.cuda_graphs=true (--cuda-graphs) needs a CUDA device; none is visible")
        return True


FLAGS: dict[str, str] = {
    "tasks": "tasks.names",
    "seeds": "tasks.seeds",
    "first_seed": "tasks.first_seed",
    "mnli_start": "tasks.mnli_start",
    "data_dir": "data.dir",
    "limit_train": "data.limit_train",
    "limit_eval": "data.limit_eval",
    "tokenizer": "tokenizer",
    "save_every": "run.save_every",
    "eval_batch_size": "run.eval_batch_size",
    "device": "run.device",
    "cuda_graphs": "run.cuda_graphs",
}
"""Each flag of add_finetune_options (by argparse dest) and the key it sets; --hparam sets
hparams.KEY, --max-length hparams.max_length and --no-progress run.progress."""


def add_finetune_options(parser: argparse.ArgumentParser) -> None:
    """The flags shared by finetune-glue and pareto, and the key=value overrides after them.
    A flag left out leaves its key at the FinetuneConfig default."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="settings overrides, e.g. tasks.seeds=3 hparams.rte.lr=2e-5"
    )
    parser.add_argument("--tasks", help=f"comma-separated GLUE tasks ({','.join(TASKS)}), or 'all' (default)")
    parser.add_argument(
        "--data-dir", help="local GLUE TSV or JSONL files (DIR/MNLI/train.tsv ...); default: the hub's nyu-mll/glue"
    )
    parser.add_argument(
        "--seeds", help="seeds per task: N, or TASK=N,... (default: 1 for MNLI/QNLI/QQP, 5 for the rest)"
    )
    parser.add_argument("--first-seed", type=int, help="seed k of a task is FIRST_SEED + k (default: 42)")
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="[TASK.]KEY=VALUE",
        help="override the recipe, e.g. epochs=1 or rte.lr=2e-5 (repeatable)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument(
        "--mnli-start",
        action=argparse.BooleanOptionalAction,
        help="start RTE, MRPC and STS-B from the MNLI-finetuned model (the paper's recipe; default)",
    )
    parser.add_argument(
        "--save-every", type=int, help="save resumable state every N steps (0: only at the end; default: 2000)"
    )
    parser.add_argument("--eval-batch-size", type=int, help="default: 128")
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens per example after truncation, every task (default: the recipe's 256; same as "
        "hparams.max_length=N; learned position embeddings must cover it, ALiBi models take any length)",
    )
    parser.add_argument("--limit-train", type=int, help="use only the first N training examples (smoke runs)")
    parser.add_argument("--limit-eval", type=int, help="use only the first N dev examples (smoke runs)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="training steps as CUDA-graph replays (one GPU, MosaicBERT; default: off until measured)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _flag_settings(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(key, value) for each flag that was given, in FLAGS order, then --hparam, then --no-progress."""
    settings = [(key, getattr(args, dest)) for dest, key in FLAGS.items() if getattr(args, dest, None) is not None]
    if getattr(args, "max_length", None) is not None:
        settings.append(("hparams.max_length", args.max_length))
    for item in getattr(args, "hparam", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--hparam {item!r}: expected KEY=VALUE or TASK.KEY=VALUE")
        settings.append((f"hparams.{key.strip()}", value))
    if getattr(args, "no_progress", False):
        settings.append(("run.progress", False))
    return settings


def load_finetune_config(
    overrides: Iterable[str] = (), args: argparse.Namespace | None = None, **values: Any
) -> FinetuneConfig:
    """FinetuneConfig from top-level `values` (model=..., out=...), then the flags in `args`, then
    `key=value` overrides; checked."""
    tree: dict[str, Any] = dict(values)
    for key, value in _flag_settings(args) if args is not None else []:
        set_dotted(tree, key, value)
    apply_overrides(tree, overrides)
    cfg = from_dict(FinetuneConfig, tree, root="the finetuning settings")
    cfg.validate()
    return cfg
