"""Write the shipped DeepSpeed configs (and the table in README.md) from one rule.

    python ds_configs/generate.py           # rewrite ds_configs/*.json and the README table
    python ds_configs/generate.py --check   # exit 1 if the files on disk differ from the rule

The rule (README.md explains it): 4096 sequences per step up to 8 GPUs, 512 per GPU beyond;
micro batch 256 (Base) / 128 (Large); AdamW lr 5e-4 x sqrt(batch / 4096) capped at 2e-3, and
LAMB variants from 32768 up with lr 6e-3 x sqrt(batch / 65536) capped at 6e-3. Every file is
built by `build_ds_config`, the one place that sets the batch keys.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.schedule import warmup_length

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- generated table: start -->", "<!-- generated table: end -->"

GPU_COUNTS = (1, 8, 16, 32, 64, 128, 200)
SAMPLE_BUDGET = 286_720_000  # the paper's 70,000 steps x 4096
WARMUP_FRACTION = 0.06
MIN_WARMUP_STEPS = 1000  # schedule.min_warmup_steps of the mosaicbert-base/-large recipes
PAPER_BATCH, PAPER_LR = 4096, 5e-4
PER_GPU_SAMPLES = 512  # sequences per GPU per optimizer step beyond one node (Appendix G)
ADAMW_LR_CAP = 2e-3
LAMB_FROM_BATCH, LAMB_LR_AT_64K, LAMB_LR_CAP = 32768, 6e-3, 6e-3
# H200 measurements (benchmarks/results/h200_2026-11-29): smaller micro batches leave the GPU
# waiting on the host's kernel launches; Large: half of Base, for headroom on 40 GB cards
MICRO_BATCH = {"base": 256, "large": 128}


@dataclass(frozen=True)
class Plan:
    """One shipped file."""

    model: str
    gpus: int
    global_batch: int
    micro_batch: int
    optimizer: str
    lr: float

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.gpus)

    @property
    def steps(self) -> int:
        return SAMPLE_BUDGET // self.global_batch

    @property
    def warmup_steps(self) -> int:
        return warmup_length(self.steps, WARMUP_FRACTION, MIN_WARMUP_STEPS)

    @property
    def filename(self) -> str:
        suffix = "_lamb" if self.optimizer == "lamb" else ""
        return f"mosaicbert-{self.model}_{self.gpus}gpu{suffix}.json"

    @property
    def hardware(self) -> str:
        if self.gpus == 1:
            return "1 GPU (80 GB class: A100-80GB, H100, H200)"
        nodes = self.gpus // 8
        return f"{nodes} node{'s' if nodes > 1 else ''} x 8 GPUs (A100-80GB/H100/H200)"

    def config(self) -> dict:
        return build_ds_config(
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            world_size=self.gpus,
            lr=self.lr,
            optimizer=self.optimizer,
            fused=True,
        )


def global_batch_for(gpus: int) -> int:
    return PAPER_BATCH if gpus <= 8 else PER_GPU_SAMPLES * gpus


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def adamw_lr(batch: int) -> float:
    return _round(min(PAPER_LR * math.sqrt(batch / PAPER_BATCH), ADAMW_LR_CAP))


def lamb_lr(batch: int) -> float:
    return _round(min(LAMB_LR_AT_64K * math.sqrt(batch / 65536), LAMB_LR_CAP))


def plans() -> list[Plan]:
    out = []
    for model in ("base", "large"):
        for gpus in GPU_COUNTS:
            batch = global_batch_for(gpus)
            out.append(Plan(model, gpus, batch, MICRO_BATCH[model], "adamw", adamw_lr(batch)))
            if batch >= LAMB_FROM_BATCH:
                out.append(Plan(model, gpus, batch, MICRO_BATCH[model], "lamb", lamb_lr(batch)))
    return out


def render(plan: Plan) -> str:
    return json.dumps(plan.config(), indent=2) + "\n"


def table() -> str:
    rows = [
        "| file | hardware | GPUs | global batch | micro | accum | optimizer | peak lr | steps | warmup steps |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for p in plans():
        rows.append(
            f"| `{p.filename}` | {p.hardware} | {p.gpus} | {p.global_batch:,} | {p.micro_batch} | "
            f"{p.accumulation} | {p.optimizer} | {p.lr:g} | {p.steps:,} | {p.warmup_steps:,} |"
        )
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, sep1, rest = text.partition(TABLE_START)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep1 and sep2):
        raise SystemExit(f"{README}: missing the {TABLE_START} / {TABLE_END} markers")
    return f"{head}{TABLE_START}\n{table()}\n{TABLE_END}{tail}"


def expected_files(out_dir: Path) -> dict[Path, str]:
    files = {out_dir / p.filename: render(p) for p in plans()}
    files[README] = readme_with_table(README.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any difference")
    args = parser.parse_args(argv)
    expected = expected_files(HERE)
    if args.check:
        problems = [
            f"{path.name}: {'differs' if path.exists() else 'missing'}"
            for path, text in expected.items()
            if not path.exists() or path.read_text() != text
        ]
        problems += [
            f"{path.name}: not written by generate.py" for path in sorted(HERE.glob("*.json")) if path not in expected
        ]
        for line in problems:
            print(f"ds_configs: {line}", file=sys.stderr)
        if problems:
            print("ds_configs: run `python ds_configs/generate.py` and commit the result", file=sys.stderr)
            return 1
        print(f"ds_configs: {len(expected)} files match the generator")
        return 0
    for path, text in expected.items():
        path.write_text(text)
    for path in sorted(HERE.glob("*.json")):
        if path not in expected:  # left alone; --check will complain about it
            print(f"ds_configs: {path.name} is not generated: delete it or add it to the rule", file=sys.stderr)
    print(f"ds_configs: wrote {len(expected)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
