"""`mosaicbert-ds bench convergence`: time-to-loss of several models under one wall-clock budget.

Each model is trained by the real trainer (`mosaicbert-ds pretrain`, a subprocess: the DeepSpeed
engine, the MDS loader, bf16 on a GPU) for the same seconds of training on the same data with the
same global batch, optimizer and schedule; only what defines the model differs (its recipe: preset,
masking rate, padded batches, plus any override list). The held-out MLM loss is measured at fixed
wall-clock points with one masking rate (`--eval-mlm`, 0.15) for every model.

    # one model per call (each call writes OUT/NAME/), then the merged report:
    python -m benchmarks.convergence --data runs/prose/mds --out runs/conv --seconds 300 --only mosaicbert
    python -m benchmarks.convergence --data runs/prose/mds --out runs/conv --seconds 300 --only bert
    python -m benchmarks.convergence --out runs/conv --report
    # or all models in one call (training, then the report):
    python -m benchmarks.convergence --data runs/prose/mds --out runs/conv --seconds 300

Models are `NAME=RECIPE[,key=value,...]`; the default pair is
`mosaicbert=mosaicbert-base` and `bert=bert-base`. A Figure-4 ablation is one more, e.g.
`--model "no-alibi=mosaicbert-base,model.overrides.alibi=false"`.

The report (OUT/convergence.md, .json, .png) gives per model the final eval loss, the training
seconds it needed to reach each other model's final loss (interpolated between eval points; "-"
when it never did), the training seconds and steps to each loss target below the unigram level
(`--targets`, nats below it; "never" with the best loss reached, and a sentence saying so), the
median tokens/s and MFU over the training log intervals (the first one, with start-up and
compilation, left out), and the curves of eval loss against seconds and tokens. The JSON also
records the corpus, seed, git commit, whether the tree was dirty, the command lines and versions.

Several (corpus, seed) runs, one OUT each, are combined with
`--combine OUT1 OUT2 ... --out SUMMARY` (benchmarks.convergence_summary): mean and spread of the
time ratios to each target.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from mosaicbert_ds.data.unigram import unigram_loss
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.outputs import atomic_write_json, atomic_write_text

DEFAULT_MODELS = ["mosaicbert=mosaicbert-base", "bert=bert-base"]
DEFAULT_MIN_WARMUP_STEPS = 1000  # schedule.min_warmup_steps for every model (docs/convergence.md)
RESULT = "convergence_run.json"  # written in OUT/NAME/ when that model's training has finished


def parse_model(spec: str) -> tuple[str, str, list[str]]:
    """NAME=RECIPE[,key=value,...] -> (name, recipe, overrides)."""
    name, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()] if sep else []
    if not name.strip() or not parts or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--model {spec!r} is not NAME=RECIPE[,key=value,...] (NAME: letters, digits, - and _)")
    if any("=" not in p for p in parts[1:]):
        raise UserError(f"--model {spec!r}: overrides after the recipe must be key=value")
    return name.strip(), parts[0], parts[1:]


def shared_overrides(args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The settings every model shares: data, batch, optimizer, schedule, budget, eval and logging."""
    return [
        f"data.path={args.data}",
        f"data.eval_mlm_probability={args.eval_mlm}",
        f"data.num_workers={args.num_workers}",
        f"batch.global_batch={args.global_batch}",
        f"batch.micro_batch={args.micro_batch}",
        f"optimizer.lr={args.lr}",
        f"schedule.warmup_fraction={args.warmup_fraction}",
        f"schedule.min_warmup_steps={args.min_warmup_steps}",
        f"duration.steps={args.max_steps}",
        f"duration.train_seconds={args.seconds}",
        "eval.interval=0",
        f"eval.interval_seconds={args.eval_every}",
        f"eval.batches={args.eval_batches}",
        "checkpoint.interval=0",
        f"checkpoint.interval_seconds={args.checkpoint_every}",
        "checkpoint.resume=none",
        f"log.interval={args.log_interval}",
        "log.progress_bar=false",
        "log.tensorboard=false",
        f"output_dir={out_dir}",
        f"seed={args.seed}",
        *([f"precision={args.precision}"] if args.precision else []),
    ]


def train_model(args: argparse.Namespace, spec: str) -> Path:
    """Train one model into OUT/NAME/ through the pretrain command; returns that folder."""
    name, recipe, overrides = parse_model(spec)
    run_dir = Path(args.out) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty: pick another --out or remove it (this command never overwrites)")
    cmd = [
        sys.executable,
        "-m",
        "mosaicbert_ds.cli",
        "pretrain",
        recipe,
        *shared_overrides(args, run_dir),
        *overrides,
        *args.override,
    ]
    print("$ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode:
        raise UserError(f"training {name} failed (exit {done.returncode}); its log is in {run_dir}")
    atomic_write_json(
        run_dir / RESULT,
        {
            "name": name,
            "recipe": recipe,
            "overrides": overrides,
            "train_command": shlex.join(cmd),
            "budget_seconds": args.seconds,
            "data": str(args.data),
            "corpus": args.corpus or corpus_label(args.data),
            "seed": args.seed,
            "unigram_loss": dataset_unigram(args.data),
            **provenance(sys.argv[1:]),
        },
    )
    return run_dir


def read_curve(run_dir: Path) -> dict[str, Any]:
    """Eval points (seconds, tokens, loss) and training throughput from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_train: dict[str, Any] = {}
    points, tok_s, mfu, mfu_exact = [], [], [], []
    for row in rows:
        if "loss/train" in row:
            last_train = row
            tok_s.append(row.get("throughput/tokens_per_sec"))
            mfu.append(row.get("throughput/mfu"))
            mfu_exact.append(row.get("throughput/mfu_exact"))
        if "loss/eval" in row and last_train.get("step") == row["step"]:
            points.append(
                {
                    "step": row["step"],
                    "seconds": last_train["progress/train_seconds"],
                    "tokens": last_train["progress/tokens"],
                    "loss": row["loss/eval"],
                    "accuracy": row.get("accuracy/eval"),
                }
            )

    def median(values: list[Any]) -> float | None:
        kept = [v for v in values[1:] or values if v is not None]
        return statistics.median(kept) if kept else None

    return {
        "points": points,
        "tokens_per_sec": median(tok_s),
        "mfu": median(mfu),
        "mfu_exact": median(mfu_exact),
        "final_loss": points[-1]["loss"] if points else None,
        "train_seconds": last_train.get("progress/train_seconds"),
        "tokens": last_train.get("progress/tokens"),
        "steps": last_train.get("step"),
        "final_train_loss": last_train.get("loss/train"),
    }


def crossing(points: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Training seconds, steps and tokens at which the eval curve first reaches `target` (linear
    between eval points), or None when it never does."""
    prev = None
    for p in points:
        if p["loss"] <= target:
            if prev is None or prev["loss"] == p["loss"]:
                return {k: p[k] for k in ("seconds", "step", "tokens")}
            frac = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return {k: prev[k] + frac * (p[k] - prev[k]) for k in ("seconds", "step", "tokens")}
        prev = p
    return None


def time_to_loss(points: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at which the eval curve first reaches `target` (linear between points)."""
    hit = crossing(points, target)
    return None if hit is None else hit["seconds"]


def targets_below_unigram(unigram: float | None, nats: list[float]) -> list[dict[str, float]]:
    """The loss targets `unigram - k` for each k in `nats` (none without a unigram level)."""
    return [] if unigram is None else [{"below_unigram": k, "loss": unigram - k} for k in nats]


def time_to_targets(m: dict[str, Any], targets: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Per target: seconds, steps and tokens to reach it (None each when never reached)."""
    out = []
    for t in targets:
        hit = crossing(m["points"], t["loss"])
        out.append({**t, **(hit or {"seconds": None, "step": None, "tokens": None}), "reached": hit is not None})
    return out


def dataset_unigram(data: str | Path) -> float | None:
    """The held-out unigram level of a local dataset (None without val/)."""
    return unigram_loss(data) if (Path(data) / "val").is_dir() else None


def corpus_label(data: str | Path) -> str:
    """A dataset's name in reports: its folder, with the parent for the usual OUT/mds layout."""
    path = Path(data).resolve()
    return path.parent.name if path.name == "mds" else path.name


def provenance(argv: list[str]) -> dict[str, Any]:
    import torch

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "streaming", "triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: recorded as such
            versions[mod] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "command": shlex.join([sys.executable, "-m", "benchmarks.convergence", *argv]),
        "device": gpu,
        "versions": versions,
    }


def report(out: Path, argv: list[str], nats: list[float] = (1.0, 2.0, 3.0)) -> dict[str, Any]:
    """Merge OUT/*/convergence_run.json runs into convergence.md/.json/.png: per model the final
    and best eval loss, the time to every other model's final loss and to the targets `nats`
    below the unigram level."""
    runs = sorted(p.parent for p in out.glob(f"*/{RESULT}"))
    if not runs:
        raise UserError(f"no finished model runs under {out} (each has {RESULT})")
    models = {}
    for run_dir in runs:
        meta = json.loads((run_dir / RESULT).read_text())
        models[meta["name"]] = {**meta, **read_curve(run_dir)}
    first = next(iter(models.values()))
    data = first.get("data")
    unigram = dataset_unigram(data) if data and Path(data).is_dir() else first.get("unigram_loss")
    targets = targets_below_unigram(unigram, nats)
    for name, m in models.items():
        m["time_to_final_of"] = {
            other: time_to_loss(m["points"], o["final_loss"])
            for other, o in models.items()
            if other != name and o["final_loss"] is not None
        }
        m["best_loss"] = min((p["loss"] for p in m["points"]), default=None)
        m["time_to_targets"] = time_to_targets(m, targets)
    # where the runs were measured (each model's own record) and where the report was merged
    result = {
        "models": models,
        "device": first.get("device"),
        "git_commit": first.get("git_commit", ""),
        "git_dirty": first.get("git_dirty"),
        "report": provenance(argv),
    }
    result["command"] = "; ".join(m.get("command", "") for m in models.values())
    result["unigram_loss"] = unigram
    result["targets"] = targets
    result["corpus"] = first.get("corpus") or (corpus_label(data) if data else None)
    result["seed"] = first.get("seed")
    atomic_write_json(out / "convergence.json", result)
    atomic_write_text(out / "convergence.md", markdown(result))
    plot(models, out / "convergence.png", targets)
    return result


def pareto_listing(out: Path, names: list[str] | None = None) -> Path:
    """OUT/pareto_listing.json for `mosaicbert-ds pareto`: every checkpoint of the finished runs
    (one curve per model, hours from the checkpoint's train_seconds). A checkpoint already
    finetuned into OUT/pareto/<label>/results.json is listed by that file instead of its path, so
    the same listing redraws the plot (`pareto --no-finetune`) where the checkpoints are gone."""
    entries = []
    for run_dir in sorted(p.parent for p in out.glob(f"*/{RESULT}")):
        name = run_dir.name
        if names and name not in names:
            continue
        for state in sorted(run_dir.glob("checkpoints/step_*/trainer_state.json")):
            tag = state.parent
            label = f"{name}-{tag.name}"
            hours = json.loads(state.read_text())["train_seconds"] / 3600
            entries.append({"path": str(tag.resolve()), "hours": hours, "label": label, "run": name})
        for results in sorted((out / "pareto").glob(f"{name}-step_*/results.json")):
            label = results.parent.name
            if not any(e["label"] == label for e in entries):
                hours = json.loads((results.parent / "pareto_point.json").read_text())["hours"]
                entries.append({"hours": hours, "label": label, "run": name})
    for e in entries:
        results = out / "pareto" / e["label"] / "results.json"
        if results.exists():
            e["results"] = str(results.resolve())
            e.pop("path", None)
        if "path" in e:  # record the hours beside the finetuning results for later merges
            atomic_write_json(out / "pareto" / e["label"] / "pareto_point.json", {"hours": e["hours"]})
    if not entries:
        raise UserError(f"no checkpoints or finetuning results under {out}")
    path = out / "pareto_listing.json"
    atomic_write_json(path, entries)
    return path


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    models = result["models"]
    names = list(models)
    head = [
        "model",
        "recipe",
        "train s",
        "steps",
        "tokens",
        "final eval loss",
        "tokens/s",
        "MFU",
        *[f"s to {n}'s final" for n in names],
    ]
    lines = [
        f"# Time to loss ({result['device']}, commit {result['git_commit'][:10]}"
        f"{', dirty' if result['git_dirty'] else ''})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in models.items():
        recipe = " ".join([m["recipe"], *m["overrides"]])
        cells = [
            name,
            recipe,
            _fmt(m["train_seconds"], ".0f"),
            str(m["steps"]),
            _fmt(m["tokens"], ",.0f"),
            _fmt(m["final_loss"], ".4f"),
            _fmt(m["tokens_per_sec"], ",.0f"),
            _fmt(m["mfu"], ".1%"),
            *[("(own)" if n == name else _fmt(m["time_to_final_of"].get(n), ".0f")) for n in names],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("unigram_loss") is not None:
        lines += [
            "",
            f"Unigram baseline (token frequencies of train/, cross-entropy on val/): "
            f"{result['unigram_loss']:.4f} nats per token.",
        ]
    lines += targets_markdown(result)
    lines += [
        "",
        *[
            f"- {n}: `{m.get('command', '')}` (commit {m.get('git_commit', '')[:10]}"
            f"{', dirty' if m.get('git_dirty') else ''}, {m.get('device')})"
            for n, m in models.items()
        ],
        "",
    ]
    return "\n".join(lines)


def describe_target(m: dict[str, Any], t: dict[str, Any]) -> str:
    """One table cell: seconds and steps to a target, or `never` with the best loss reached."""
    if t["reached"]:
        return f"{t['seconds']:.0f} s ({t['step']:,.0f} steps)"
    return f"never (best {_fmt(m.get('best_loss'), '.3f')})"


def targets_markdown(result: dict[str, Any]) -> list[str]:
    """The time-to-target table and one plain sentence per target some model never reached."""
    models, targets = result["models"], result.get("targets") or []
    if not targets:
        return []
    head = ["model", *[f"unigram - {t['below_unigram']:g} ({t['loss']:.3f})" for t in targets]]
    lines = [
        "",
        "Training time (and steps) to reach each loss target below the unigram level:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    missed = []
    for name, m in models.items():
        reached = m.get("time_to_targets") or []
        lines.append("| " + " | ".join([name, *[describe_target(m, t) for t in reached]]) + " |")
        missed += [
            f"- {name} never reached {t['loss']:.3f} (unigram - {t['below_unigram']:g}) in its "
            f"{_fmt(m.get('train_seconds'), '.0f')} s; its best eval loss was {_fmt(m.get('best_loss'), '.3f')}."
            for t in reached
            if not t["reached"]
        ]
    return lines + ([""] + missed if missed else [])


def plot(models: dict[str, Any], path: Path, targets: list[dict[str, float]] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in models.items():
        pts = m["points"]
        ax_t.plot([p["seconds"] / 60 for p in pts], [p["loss"] for p in pts], marker="o", ms=3, label=name)
        ax_k.plot([p["tokens"] / 1e6 for p in pts], [p["loss"] for p in pts], marker="o", ms=3, label=name)
    ax_t.set_xlabel("training minutes")
    ax_k.set_xlabel("tokens seen (millions)")
    for ax in (ax_t, ax_k):
        for t in targets:
            ax.axhline(t["loss"], color="grey", lw=0.8, ls=":")
        if targets:
            ax.axhline(targets[0]["loss"] + targets[0]["below_unigram"], color="grey", lw=1, ls="--", label="unigram")
        ax.set_ylabel("held-out MLM loss (15% masking)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mosaicbert-ds bench convergence",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", required=True, help="output folder: one sub-folder per model, the report at the top")
    p.add_argument("--data", help="dataset written by `mosaicbert-ds convert` (train/ and val/)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME=RECIPE[,k=v...]",
        help=f"a model to train (repeatable; default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="train only these of the models (one call per model), then stop without a report",
    )
    p.add_argument("--report", action="store_true", help="only merge the finished runs under --out")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR",
        help="only combine the reports (DIR/convergence.json) of several (corpus, seed) runs into --out "
        "(convergence_summary.md, .json, .png): mean and spread of the time ratios per target",
    )
    p.add_argument("--baseline", default="bert", help="the model the time ratios are taken against (--combine)")
    p.add_argument(
        "--targets",
        default="1,2,3",
        help="loss targets as nats below the unigram level, comma-separated (default 1,2,3)",
    )
    p.add_argument("--corpus", help="the corpus's name in reports (default: the --data folder's name)")
    p.add_argument(
        "--pareto-listing",
        action="store_true",
        help="only write OUT/pareto_listing.json (the --only models' checkpoints, or all) for `mosaicbert-ds pareto`",
    )
    p.add_argument("--seconds", type=float, default=300.0, help="training seconds per model (default 300)")
    p.add_argument("--eval-every", type=float, default=15.0, help="eval every this many training seconds")
    p.add_argument("--eval-batches", type=int, default=8, help="micro batches per eval (0: the whole val split)")
    p.add_argument("--eval-mlm", type=float, default=0.15, help="masking rate at eval, the same for every model")
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=75.0,
        help="save a checkpoint every this many training seconds (for the Pareto plot); 0: only at the end",
    )
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-fraction", type=float, default=0.06)
    p.add_argument(
        "--min-warmup-steps",
        type=int,
        default=DEFAULT_MIN_WARMUP_STEPS,
        help=f"warmup floor in optimizer steps, schedule.min_warmup_steps (default {DEFAULT_MIN_WARMUP_STEPS})",
    )
    p.add_argument("--max-steps", type=int, default=100000, help="step cap (the budget normally ends the run)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log points (where time is checked)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pretrain override for every model (e.g. cuda_graphs=true)",
    )
    return p


def parse_targets(text: str) -> list[float]:
    try:
        nats = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        nats = []
    if not nats or any(not math.isfinite(k) or k <= 0 for k in nats):
        raise UserError(f"--targets {text!r}: give positive numbers of nats, comma-separated (e.g. 1,2,3)")
    return sorted(nats)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        nats = parse_targets(args.targets)
        if args.combine:
            from .convergence_summary import combine

            combine([Path(d) for d in args.combine], out, args.baseline, argv)
            print((out / "convergence_summary.md").read_text())
            print(f"wrote {out}/convergence_summary.md, convergence_summary.json, convergence_summary.png")
            return 0
        if args.pareto_listing:
            print(pareto_listing(out, args.only or None))
            return 0
        if not args.report:
            if not args.data:
                raise UserError("--data is required to train (or pass --report to merge finished runs)")
            specs = args.model or DEFAULT_MODELS
            names = [parse_model(s)[0] for s in specs]
            if len(set(names)) != len(names):
                raise UserError(f"model names must differ: {names}")
            unknown = sorted(set(args.only) - set(names))
            if unknown:
                raise UserError(f"--only {', '.join(unknown)}: not among the models ({', '.join(names)})")
            out.mkdir(parents=True, exist_ok=True)
            for spec, name in zip(specs, names):
                if not args.only or name in args.only:
                    train_model(args, spec)
            if args.only:
                return 0
        result = report(out, argv, nats)
        print((out / "convergence.md").read_text())
        print(f"wrote {out}/convergence.md, convergence.json, convergence.png")
        return 0 if all(m["final_loss"] is not None for m in result["models"].values()) else 1
    except UserError as err:
        print(f"mosaicbert-ds bench convergence: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
