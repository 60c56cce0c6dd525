"""Loss-curve regression check: a fixed-seed short run whose per-step losses are kept as a reference.

    # write a reference from 3 identical runs (the spread between them sets the tolerance)
    python -m benchmarks.loss_curve --data DATA --profile cpu-tiny --repeat 3 --out tests/data/loss_curves/cpu_tiny.json
    python -m benchmarks.loss_curve --data runs/prose/mds --profile gpu-base --repeat 3 --out ref.json
    # compare a new run with a reference (exit 1 when it is outside the tolerance)
    python -m benchmarks.loss_curve --data DATA --check tests/data/loss_curves/cpu_tiny.json

Each run is the real `mosaicbert-ds pretrain` command (DeepSpeed engine, MDS loader, the model's
kernels and dropout) with a fixed seed and log.interval=1, so metrics.jsonl holds the training
loss of every step. The check compares 10-step window means of the training loss (single steps
are noisy on GPUs whose kernels use atomics): every window must lie within the reference's
tolerance of the reference mean. The tolerance is the larger of 3x the widest spread between the
reference's identical runs in any window and a floor (`--floor`, 1e-5 for bitwise-deterministic
CPU runs; 0.02 nats for GPU runs). A change that makes the model learn worse (or just differently)
moves the curve outside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WINDOW = 10
PROFILES: dict[str, dict[str, Any]] = {
    # 2 CPU cores, about 15 s a run
    "cpu-tiny": {
        "recipe": "tiny-cpu",
        "floor": 1e-5,
        "overrides": [
            "duration.steps=40",
            "batch.global_batch=16",
            "batch.micro_batch=16",
            "optimizer.lr=2e-3",
            "precision=fp32",
        ],
    },
    # one H200, about 40 s of training + start-up: MosaicBERT-Base in bf16 with its fused kernels
    "gpu-base": {
        "recipe": "mosaicbert-base",
        "floor": 0.02,
        "overrides": [
            "duration.steps=300",
            "batch.global_batch=256",
            "batch.micro_batch=256",
            "optimizer.lr=5e-4",
            "precision=bf16",
            "schedule.min_warmup_steps=0",  # the recorded curve's schedule: 6% of 300 steps
        ],
    },
}


def run_once(data: str, profile: str, workdir: Path, extra: list[str]) -> list[float]:
    """One fixed-seed run through the pretrain command; the training loss of every step."""
    spec = PROFILES[profile]
    out = workdir / "run"
    cmd = [
        sys.executable,
        "-m",
        "mosaicbert_ds.cli",
        "pretrain",
        spec["recipe"],
        f"data.path={data}",
        *spec["overrides"],
        "seed=17",
        "log.interval=1",
        "log.progress_bar=false",
        "log.tensorboard=false",
        "eval.interval=0",
        "checkpoint.interval=0",
        "checkpoint.resume=none",
        "data.num_workers=0",
        f"output_dir={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # thread count changes CPU sums
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"pretrain failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss/train"] for r in rows if "loss/train" in r]


def data_identity(data: str) -> dict[str, Any] | None:
    """What a curve depends on in the dataset: the tokenizer's vocabulary and the split sizes.

    WordPiece training is not reproducible bit for bit (tokenizers breaks count ties in hash-map
    order), so a corpus rebuilt from the same text can carry another vocabulary and another curve.
    None for a remote dataset."""
    root = Path(data)
    index_file = root / "mosaicbert_index.json"
    if not index_file.is_file():
        return None
    splits = json.loads(index_file.read_text()).get("splits", {})
    vocab = root / "tokenizer" / "vocab.txt"
    if not vocab.is_file():
        vocab = root / "tokenizer" / "tokenizer.json"
    return {
        "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest() if vocab.is_file() else None,
        "splits": {name: {k: s.get(k) for k in ("samples", "tokens")} for name, s in sorted(splits.items())},
    }


def windows(losses: list[float]) -> list[float]:
    return [sum(losses[i : i + WINDOW]) / len(losses[i : i + WINDOW]) for i in range(0, len(losses), WINDOW)]


def make_reference(
    runs: list[list[float]], profile: str, floor: float, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    per_run = [windows(r) for r in runs]
    mean = [sum(col) / len(col) for col in zip(*per_run)]
    spread = max((max(col) - min(col)) for col in zip(*per_run))
    import torch

    return {
        "profile": profile,
        "recipe": PROFILES[profile]["recipe"],
        "overrides": PROFILES[profile]["overrides"],
        "window": WINDOW,
        "data": data,
        "runs": runs,
        "window_mean": mean,
        "spread": spread,
        "bitwise_identical": all(r == runs[0] for r in runs),
        "tolerance": max(3 * spread, floor),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }


def compare(reference: dict[str, Any], losses: list[float], data: dict[str, Any] | None = None) -> list[str]:
    """Problems of a new run against a reference (empty when it matches); `data`: the run's
    dataset (`data_identity`), which must be the reference's."""
    if data is not None and reference.get("data") not in (None, data):
        return [
            f"the reference was made on another dataset ({reference['data']}; this one: {data}): "
            "rebuild the corpus with the reference's tokenizer or make a new reference"
        ]
    expected = reference["window_mean"]
    got = windows(losses)
    if len(got) != len(expected):
        return [f"{len(losses)} steps, the reference has {len(reference['runs'][0])}"]
    tol = reference["tolerance"]
    return [
        f"steps {i * WINDOW + 1}-{(i + 1) * WINDOW}: mean loss {g:.6f}, reference {e:.6f} (tolerance {tol:.2g})"
        for i, (g, e) in enumerate(zip(got, expected))
        if abs(g - e) > tol
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--data", required=True, help="dataset written by `mosaicbert-ds convert`")
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu-tiny")
    parser.add_argument("--repeat", type=int, default=3, help="identical runs for a reference")
    parser.add_argument("--floor", type=float, default=None, help="smallest tolerance (default: the profile's)")
    parser.add_argument("--out", help="write a reference here")
    parser.add_argument("--check", help="compare one new run with this reference")
    parser.add_argument("--override", action="append", default=[], help="extra pretrain key=value")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.check):
        parser.error("give exactly one of --out and --check")
    if args.check:
        reference = json.loads(Path(args.check).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            losses = run_once(args.data, reference["profile"], Path(tmp), args.override)
        problems = compare(reference, losses, data_identity(args.data))
        print("\n".join(problems) or f"loss curve matches {args.check} ({len(losses)} steps)")
        return 1 if problems else 0
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_once(args.data, args.profile, Path(tmp), args.override))
        print(f"run {i + 1}: {len(runs[-1])} steps, last window {windows(runs[-1])[-1]:.5f}", flush=True)
    floor = PROFILES[args.profile]["floor"] if args.floor is None else args.floor
    reference = make_reference(runs, args.profile, floor, data_identity(args.data))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(reference, indent=1) + "\n")
    print(
        f"wrote {args.out}: spread {reference['spread']:.3g}, tolerance {reference['tolerance']:.3g}, "
        f"bitwise identical: {reference['bitwise_identical']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
