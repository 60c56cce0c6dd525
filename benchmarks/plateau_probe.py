"""When does a model leave the unigram plateau? Short step-counted runs of `mosaicbert-ds pretrain`.

    python -m benchmarks.plateau_probe --data runs/quickstart/data --out runs/plateau \\
        --run "bert-w0=bert-tiny,schedule.warmup_steps=0" \\
        --run "bert-w100=bert-tiny,schedule.warmup_steps=100"

Each run is `NAME=MODEL[,key=value,...]`, MODEL one of the tiny stand-ins below or any recipe;
every run shares the probe's settings (batch, rate, steps, evaluation every `--eval-every` steps
on the whole held-out split at 15% masking) unless its own overrides change them. The table gives
per run the step at which the held-out loss first fell `--margin` nats below the unigram
baseline ("never" when it did not), the eval loss at the end, and the mean gradient norm over the
run. Finished runs are kept (OUT/NAME/metrics.jsonl): adding a run to the command trains only it.
The table is written to OUT/plateau.md and OUT/plateau.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from mosaicbert_ds.data.unigram import unigram_loss
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.outputs import atomic_write_json, atomic_write_text

# Tiny stand-ins for the two Base models: 4 layers, width 128, the architecture switches of each.
MODELS = {
    "mosaic-tiny": [
        "mosaicbert-base",
        "model.preset=tiny",
        "model.overrides.num_hidden_layers=4",
        "model.overrides.hidden_size=128",
        "model.overrides.num_attention_heads=4",
        "model.overrides.intermediate_size=256",
    ],
    "bert-tiny": [
        "bert-base",
        "model.preset=tiny",
        "model.overrides.num_hidden_layers=4",
        "model.overrides.hidden_size=128",
        "model.overrides.num_attention_heads=4",
        "model.overrides.intermediate_size=512",
        "model.overrides.position_embedding_type=learned",
        "model.overrides.mlp_type=gelu",
        "model.overrides.unpad=false",
        "model.overrides.attention_probs_dropout_prob=0.1",
    ],
}
DONE = "probe_run.json"


def parse_run(spec: str) -> tuple[str, list[str]]:
    """NAME=MODEL[,key=value,...] -> (name, pretrain arguments: recipe first, then overrides)."""
    name, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not sep or not parts or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--run {spec!r} is not NAME=MODEL[,key=value,...]")
    if any("=" not in p for p in parts[1:]):
        raise UserError(f"--run {spec!r}: overrides after the model must be key=value")
    return name, [*MODELS.get(parts[0], [parts[0]]), *parts[1:]]


def train(args: argparse.Namespace, name: str, pretrain_args: list[str]) -> Path:
    run_dir = Path(args.out) / name
    if (run_dir / DONE).exists():
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} holds an unfinished run: remove it or pick another name")
    recipe, overrides = pretrain_args[0], pretrain_args[1:]
    cmd = [
        sys.executable,
        "-m",
        "mosaicbert_ds.cli",
        "pretrain",
        recipe,
        f"data.path={args.data}",
        "data.num_workers=0",
        "data.eval_mlm_probability=0.15",
        f"batch.global_batch={args.batch}",
        f"batch.micro_batch={args.batch}",
        f"optimizer.lr={args.lr}",
        f"duration.steps={args.steps}",
        f"eval.interval={args.eval_every}",
        "eval.batches=0",
        "checkpoint.interval=0",
        "checkpoint.resume=none",
        f"log.interval={args.eval_every}",
        "log.progress_bar=false",
        "log.tensorboard=false",
        "precision=fp32",
        f"seed={args.seed}",
        f"output_dir={run_dir}",
        *overrides,
    ]
    print("$ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise UserError(f"run {name} failed (exit {done.returncode})")
    atomic_write_json(run_dir / DONE, {"name": name, "command": shlex.join(cmd)})
    return run_dir


def summarise(run_dir: Path, unigram: float, margin: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["loss/eval"]) for r in rows if "loss/eval" in r]
    norms = [r["optim/grad_norm"] for r in rows if r.get("optim/grad_norm") is not None]
    left = next((step for step, loss in evals if loss < unigram - margin), None)
    return {
        "name": run_dir.name,
        "left_plateau_at_step": left,
        "final_eval_loss": evals[-1][1] if evals else None,
        "final_train_loss": next((r["loss/train"] for r in reversed(rows) if "loss/train" in r), None),
        "mean_grad_norm": sum(norms) / len(norms) if norms else None,
        "eval": evals,
        "command": json.loads((run_dir / DONE).read_text())["command"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--data", required=True, help="dataset written by `mosaicbert-ds convert`")
    p.add_argument("--out", required=True, help="one sub-folder per run, the table at the top")
    p.add_argument("--run", action="append", required=True, metavar="NAME=MODEL[,k=v...]")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--margin", type=float, default=0.3, help="nats below the unigram baseline that count as left")
    p.add_argument("--seed", type=int, default=17)
    args = p.parse_args(argv)
    try:
        runs = [parse_run(s) for s in args.run]
        unigram = unigram_loss(args.data)
        results = [summarise(train(args, name, pa), unigram, args.margin) for name, pa in runs]
    except UserError as err:
        print(f"plateau_probe: error: {err}", file=sys.stderr)
        return 2
    at = [args.steps // 3, 2 * args.steps // 3, args.steps]
    lines = [
        f"unigram baseline {unigram:.3f}; left = first eval {args.margin} nats below it",
        "",
        "| run | "
        + " | ".join(f"eval loss at {a}" for a in at)
        + " | left at step | final train loss | mean grad norm |",
        "|---|" + "---:|" * (len(at) + 3),
    ]
    for r in results:
        losses = dict(r["eval"])
        cells = [f"{losses[a]:.3f}" if a in losses else "-" for a in at]
        lines.append(
            f"| {r['name']} | {' | '.join(cells)} | {r['left_plateau_at_step'] or 'never'} | "
            f"{r['final_train_loss']:.3f} | {r['mean_grad_norm']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    atomic_write_text(out / "plateau.md", text)
    atomic_write_json(out / "plateau.json", {"unigram_loss": unigram, "margin": args.margin, "runs": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
