"""The eight GLUE tasks as data: fields, labels, file layouts, metrics and the paper's recipe.

Everything task-specific lives in TASKS, so the loader, trainer and report never branch on a
task's name. Hyperparameters are the paper's: Portes et al., "MosaicBERT: A Bidirectional Encoder
Optimized for Fast Pretraining", NeurIPS 2023, Appendix B, Table S2; `--hparam` overrides them.

Seeds (our convention, after the paper's recipe): the large tasks MNLI, QNLI and QQP run one
seed each, the small ones (SST-2, CoLA, RTE, MRPC, STS-B) five. Seed k of a task is
`first_seed + k`. RTE, MRPC and STS-B seed k start from the MNLI model of MNLI seed
k mod (number of MNLI seeds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Hparams:
    """One task's finetuning recipe."""

    lr: float
    """Peak learning rate."""
    weight_decay: float
    """Decoupled weight decay as in the paper's Composer DecoupledAdamW: each step multiplies
    the weights by (1 - weight_decay * lr_t / lr), i.e. torch AdamW with weight_decay / lr."""
    epochs: float
    """Passes over the training split."""
    batch_size: int
    """Global batch size (split across data-parallel ranks)."""
    warmup_fraction: float = 0.06
    """Linear warmup over this fraction of the steps, then linear decay to 0."""
    max_length: int = 256
    """Tokens per example after truncation (longest text of a pair first)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns it off. Not stated by the paper: our choice."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6

    def validate(self) -> None:
        checks = [
            ("lr", self.lr > 0),
            ("weight_decay", self.weight_decay >= 0),
            ("epochs", self.epochs > 0),
            ("batch_size", self.batch_size >= 1),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1),
            ("max_length", self.max_length >= 2),
            ("max_grad_norm", self.max_grad_norm >= 0),
            ("beta1", 0 <= self.beta1 < 1),
            ("beta2", 0 <= self.beta2 < 1),
            ("eps", self.eps > 0),
        ]
        for name, ok in checks:
            if not ok or not math.isfinite(float(getattr(self, name))):
                raise UserError(f"hyperparameter {name}={getattr(self, name)} is out of range")


@dataclass(frozen=True)
class TsvLayout:
    """Where text and label sit in the task's GLUE TSV files: header names, or column numbers
    when the file has no header (CoLA)."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    """Short lower-case name, also the output folder: "mnli", "sst2", "stsb"."""
    display: str
    """The name in GLUE's own spelling and folder name: "MNLI", "SST-2", "STS-B"."""
    fields: tuple[str, str | None]
    """Text columns in the Hugging Face dataset (and in JSONL files)."""
    num_labels: int
    """Classes; 1 means regression (STS-B, scores 0..5)."""
    tsv: TsvLayout
    label_names: tuple[str, ...] = ()
    """Labels as spelled in the TSV files, in the HF dataset's index order (empty: numbers)."""
    eval_splits: tuple[tuple[str, str], ...] = (("", "validation"),)
    """(metric suffix, HF split name) of each dev split."""
    metrics: tuple[str, ...] = ("accuracy",)
    score_metric: str = "accuracy"
    """The metric that enters the GLUE average."""
    hparams: Hparams = Hparams(lr=3e-5, weight_decay=3e-6, epochs=3, batch_size=16)
    from_mnli: bool = False
    """Start from the MNLI-finetuned model instead of the pretrained one."""
    default_seeds: int = 5

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def metric_keys(self) -> list[str]:
        """Result keys, e.g. ["accuracy_m", "accuracy_mm"] for MNLI, ["f1", "accuracy"] for QQP."""
        return [f"{m}_{suffix}" if suffix else m for suffix, _ in self.eval_splits for m in self.metrics]


_NLI = ("entailment", "not_entailment")

# Run order: MNLI first, since RTE, MRPC and STS-B start from its checkpoint.
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            3,
            TsvLayout("sentence1", "sentence2", "gold_label"),
            ("entailment", "neutral", "contradiction"),
            eval_splits=(("m", "validation_matched"), ("mm", "validation_mismatched")),
            score_metric="accuracy_m",
            hparams=Hparams(lr=5e-5, weight_decay=5e-6, epochs=3, batch_size=48),
            default_seeds=1,
        ),
        Task(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            2,
            TsvLayout("question", "sentence", "label"),
            _NLI,
            hparams=Hparams(lr=1e-5, weight_decay=1e-6, epochs=10, batch_size=16),
            default_seeds=1,
        ),
        Task(
            "qqp",
            "QQP",
            ("question1", "question2"),
            2,
            TsvLayout("question1", "question2", "is_duplicate"),
            metrics=("f1", "accuracy"),
            score_metric="f1",
            hparams=Hparams(lr=3e-5, weight_decay=3e-6, epochs=5, batch_size=16),
            default_seeds=1,
        ),
        Task(
            "sst2",
            "SST-2",
            ("sentence", None),
            2,
            TsvLayout("sentence", None, "label"),
            hparams=Hparams(lr=3e-5, weight_decay=3e-6, epochs=3, batch_size=16),
        ),
        Task(
            "cola",
            "CoLA",
            ("sentence", None),
            2,
            TsvLayout(3, None, 1, header=False),
            metrics=("mcc",),
            score_metric="mcc",
            hparams=Hparams(lr=5e-5, weight_decay=5e-6, epochs=10, batch_size=32),
        ),
        Task(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            2,
            TsvLayout("sentence1", "sentence2", "label"),
            _NLI,
            hparams=Hparams(lr=1e-5, weight_decay=1e-5, epochs=3, batch_size=16),
            from_mnli=True,
        ),
        Task(
            "mrpc",
            "MRPC",
            ("sentence1", "sentence2"),
            2,
            TsvLayout("#1 String", "#2 String", "Quality"),
            metrics=("f1", "accuracy"),
            score_metric="f1",
            hparams=Hparams(lr=8e-5, weight_decay=8e-6, epochs=10, batch_size=32),
            from_mnli=True,
        ),
        Task(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            1,
            TsvLayout("sentence1", "sentence2", "score"),
            metrics=("pearson", "spearman"),
            score_metric="spearman",
            hparams=Hparams(lr=3e-5, weight_decay=3e-6, epochs=10, batch_size=32),
            from_mnli=True,
        ),
    ]
}

STS_B_RANGE = (0.0, 5.0)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> Task:
    """A task by any usual spelling ("SST-2", "sst2", "sts-b"); UserError when unknown."""
    key = _normalise(name)
    if key not in TASKS:
        raise UserError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)} or 'all'")
    return TASKS[key]


def parse_tasks(spec: str | list[str]) -> list[Task]:
    """ "all" or a comma-separated list, returned in run order (MNLI first)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (s.strip() for s in names) if n]
    if not names:
        raise UserError("no GLUE task given")
    if any(_normalise(n) == "all" for n in names):
        return list(TASKS.values())
    wanted = {get_task(n).name for n in names}
    return [t for t in TASKS.values() if t.name in wanted]


def parse_seed_counts(spec: str | int | None, tasks: list[Task]) -> dict[str, int]:
    """Seeds per task from "3" (every task), "mnli=1,rte=10" or "3,mnli=1"; defaults otherwise."""
    counts = {t.name: t.default_seeds for t in tasks}
    if spec is None or spec == "":
        return counts
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"--seeds: {part!r} is not a count (use N or TASK=N)") from None
        if n < 1:
            raise UserError(f"--seeds: {part!r} must be at least 1")
        if key:
            counts[get_task(key).name] = n
        else:
            counts = {name: n for name in counts}
    return {t.name: counts.get(t.name, t.default_seeds) for t in tasks}


def apply_overrides(overrides: list[str] | None) -> dict[str, Hparams]:
    """Each task's Hparams after "KEY=VALUE" or "TASK.KEY=VALUE" overrides, in the given order."""
    result = {name: task.hparams for name, task in TASKS.items()}
    fields = {f.name: f.type for f in dataclasses.fields(Hparams)}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--hparam {item!r}: expected KEY=VALUE or TASK.KEY=VALUE")
        task_name, _, field = key.strip().rpartition(".")
        if field not in fields:
            raise UserError(f"--hparam {item!r}: unknown key {field!r}; choose from {', '.join(fields)}")
        try:
            parsed: float | int = int(value) if field in ("batch_size", "max_length") else float(value)
        except ValueError:
            raise UserError(f"--hparam {item!r}: {value!r} is not a number") from None
        names = [get_task(task_name).name] if task_name else list(result)
        for name in names:
            result[name] = dataclasses.replace(result[name], **{field: parsed})
    for hp in result.values():
        hp.validate()
    return result
