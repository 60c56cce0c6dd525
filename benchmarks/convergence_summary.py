"""Combine `bench convergence` reports of several (corpus, seed) runs: mean and spread of the time ratios.

    python -m benchmarks.convergence --combine runs/conv/prose-s17 runs/conv/prose-s18 runs/conv/sotu-s17 \\
        --out runs/conv/summary

Each DIR holds one (corpus, seed) run's report, DIR/convergence.json, as written by
`python -m benchmarks.convergence --data D --out DIR --seed S` (both models, then the report) or by
`--out DIR --report` after one call per model. The summary (OUT/convergence_summary.md, .json,
.png) gives per run and model the training seconds to each loss target below the unigram level,
and per target and model the ratio baseline seconds / model seconds (above 1: the model is that
many times faster than the baseline), its mean, standard deviation, minimum and maximum over the
runs where both reached the target, per corpus and over all runs. Runs where only one of the two
reached a target are counted and named, never averaged in.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.outputs import atomic_write_json, atomic_write_text

KIND = "convergence-summary"


def read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "convergence.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or unreadable: write it with `--out {run_dir} --report`") from None
    if not result.get("targets"):
        raise UserError(f"{path} has no loss targets (its data had no val/ split, or an older report): re-run --report")
    return {
        "dir": str(run_dir),
        "corpus": result.get("corpus") or run_dir.name,
        "seed": result.get("seed"),
        "unigram_loss": result["unigram_loss"],
        "device": result.get("device"),
        "git_commit": result.get("git_commit"),
        "models": {
            name: {
                "time_to_targets": m["time_to_targets"],
                "final_loss": m.get("final_loss"),
                "best_loss": m.get("best_loss"),
                "train_seconds": m.get("train_seconds"),
                "steps": m.get("steps"),
                "curve": [(p["seconds"], p["loss"]) for p in m["points"]],
            }
            for name, m in result["models"].items()
        },
    }


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values, default=None),
        "max": max(values, default=None),
        "values": values,
    }


def ratios(runs: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per model (not the baseline), target and corpus ("all": every run): the time ratios."""
    names = [n for n in runs[0]["models"] if n != baseline]
    nats = [t["below_unigram"] for t in runs[0]["models"][baseline]["time_to_targets"]]
    corpora = sorted({r["corpus"] for r in runs})
    rows = []
    for name in names:
        for i, k in enumerate(nats):
            for corpus in [*corpora, "all"] if len(corpora) > 1 else corpora:
                values, only_model, only_baseline, neither = [], [], [], []
                for r in runs:
                    if corpus != "all" and r["corpus"] != corpus:
                        continue
                    b, m = r["models"][baseline]["time_to_targets"][i], r["models"][name]["time_to_targets"][i]
                    label = f"{r['corpus']} seed {r['seed']}"
                    if b["reached"] and m["reached"]:
                        values.append(b["seconds"] / m["seconds"])
                    elif m["reached"]:
                        only_model.append(label)
                    elif b["reached"]:
                        only_baseline.append(label)
                    else:
                        neither.append(label)
                rows.append(
                    {
                        "model": name,
                        "below_unigram": k,
                        "corpus": corpus,
                        **spread(values),
                        "only_model_reached": only_model,
                        "only_baseline_reached": only_baseline,
                        "neither_reached": neither,
                    }
                )
    return rows


def check_alike(runs: list[dict[str, Any]], baseline: str) -> None:
    names = list(runs[0]["models"])
    if baseline not in names:
        raise UserError(f"--baseline {baseline}: not among the models ({', '.join(names)})")
    nats = [t["below_unigram"] for t in runs[0]["models"][baseline]["time_to_targets"]]
    for r in runs[1:]:
        if sorted(r["models"]) != sorted(names):
            raise UserError(f"{r['dir']} has models {sorted(r['models'])}, {runs[0]['dir']} {sorted(names)}")
        if [t["below_unigram"] for t in r["models"][baseline]["time_to_targets"]] != nats:
            raise UserError(f"{r['dir']} and {runs[0]['dir']} have different loss targets (--targets)")


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict[str, Any]) -> str:
    runs, baseline = summary["runs"], summary["baseline"]
    nats = [t["below_unigram"] for t in runs[0]["models"][baseline]["time_to_targets"]]
    corpora = sorted({r["corpus"] for r in runs})
    seeds = sorted({str(r["seed"]) for r in runs})
    lines = [
        f"# Time to loss over {len(runs)} runs (corpora: {', '.join(corpora)}; seeds: {', '.join(seeds)})",
        "",
        "Training seconds (steps) to reach each target below the unigram level; `never` with the best loss reached:",
        "",
        "| corpus | seed | unigram | model | " + " | ".join(f"unigram - {k:g}" for k in nats) + " | final loss |",
        "|" + "---|" * (5 + len(nats)),
    ]
    for r in runs:
        for name, m in r["models"].items():
            cells = [
                f"{t['seconds']:.0f} s ({t['step']:,.0f})"
                if t["reached"]
                else f"never (best {_f(m['best_loss'], '.3f')})"
                for t in m["time_to_targets"]
            ]
            lines.append(
                f"| {r['corpus']} | {r['seed']} | {r['unigram_loss']:.3f} | {name} | "
                + " | ".join(cells)
                + f" | {_f(m['final_loss'], '.3f')} |"
            )
    lines += [
        "",
        f"Time ratio: {baseline}'s seconds / the model's seconds to the same target (above 1: faster than {baseline}),"
        " over the runs where both reached it:",
        "",
        "| model | target | corpus | runs | mean | sd | min | max | only one model reached it |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for row in summary["ratios"]:
        one = [f"{row['model']} only: {', '.join(row['only_model_reached'])}"] if row["only_model_reached"] else []
        one += [f"{baseline} only: {', '.join(row['only_baseline_reached'])}"] if row["only_baseline_reached"] else []
        lines.append(
            f"| {row['model']} | unigram - {row['below_unigram']:g} | {row['corpus']} | {row['n']} | "
            f"{_f(row['mean'], '.2f')} | {_f(row['sd'], '.2f')} | {_f(row['min'], '.2f')} | {_f(row['max'], '.2f')} | "
            f"{'; '.join(one) or '-'} |"
        )
        if row["neither_reached"] and row["corpus"] != "all":
            notes.append(
                f"- neither {row['model']} nor {baseline} reached unigram - {row['below_unigram']:g} in "
                f"{', '.join(row['neither_reached'])}."
            )
    lines += ["", *notes] if notes else []
    lines += ["", *[f"- {r['dir']}: {r['device']}, commit {str(r['git_commit'])[:10]}" for r in runs], ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, baseline = summary["runs"], summary["baseline"]
    names = list(runs[0]["models"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    corpora = sorted({r["corpus"] for r in runs})
    styles = {c: s for c, s in zip(corpora, ["-", "--", "-.", ":"] * 4)}
    fig, (ax_c, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        for name, m in r["models"].items():
            ax_c.plot(
                [s / 60 for s, _ in m["curve"]],
                [loss - r["unigram_loss"] for _, loss in m["curve"]],
                color=colors[name],
                ls=styles[r["corpus"]],
                alpha=0.7,
                label=f"{name}, {r['corpus']}",
            )
    for k in [t["below_unigram"] for t in runs[0]["models"][baseline]["time_to_targets"]]:
        ax_c.axhline(-k, color="grey", lw=0.8, ls=":")
    ax_c.axhline(0, color="grey", lw=1, ls="--")
    handles, labels = ax_c.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax_c.legend(unique.values(), unique.keys(), fontsize=7)
    ax_c.set_xlabel("training minutes")
    ax_c.set_ylabel("eval loss - unigram level (nats)")
    ax_c.grid(alpha=0.3)
    others = [n for n in names if n != baseline]
    nats = [t["below_unigram"] for t in runs[0]["models"][baseline]["time_to_targets"]]
    for row in (r for r in summary["ratios"] if r["corpus"] == "all" or len(corpora) == 1):
        x = row["below_unigram"] + 0.15 * (others.index(row["model"]) - (len(others) - 1) / 2)
        ax_r.scatter([x] * row["n"], row["values"], color=colors[row["model"]], alpha=0.5, s=14)
        if row["mean"] is not None:
            ax_r.errorbar(x, row["mean"], yerr=row["sd"] or 0, color=colors[row["model"]], marker="D", capsize=4)
    ax_r.axhline(1, color="grey", lw=1, ls="--")
    ax_r.set_xticks(nats, [f"unigram - {k:g}" for k in nats])
    ax_r.set_xlim(min(nats) - 0.5, max(nats) + 0.5)
    ax_r.set_xlabel("loss target")
    ax_r.set_ylabel(f"time ratio ({baseline} s / model s)")
    ax_r.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def combine(dirs: list[Path], out: Path, baseline: str, argv: list[str]) -> dict[str, Any]:
    """Read DIR/convergence.json of each run; write OUT/convergence_summary.md, .json, .png."""
    from .convergence import provenance

    runs = [read_run(d) for d in dirs]
    check_alike(runs, baseline)
    summary = {"kind": KIND, "baseline": baseline, "runs": runs, "ratios": ratios(runs, baseline)}
    summary["report"] = provenance(argv)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "convergence_summary.json", summary)
    atomic_write_text(out / "convergence_summary.md", markdown(summary))
    plot(summary, out / "convergence_summary.png")
    return summary
