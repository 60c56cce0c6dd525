"""Benchmark reports: one folder per run with report.md, report.json and PNG plots.

    mosaicbert-ds bench report throughput.json ablations.json scaling.json
    -> benchmarks/results/<hardware>_<date>/report.md, report.json, scaling_tokens.png,
       scaling_mfu.png, ablations.png

Inputs are the JSON of benchmarks.throughput (trainer rows; with --ablations the Figure-4 rows)
and benchmarks.scaling (1/2/4-GPU points, all-reduce bandwidth, single-GPU compute and optimizer
times); any of them may be missing and the report says what is. Measurements and the scaling
model's predictions (benchmarks.scaling_model) stay apart: every predicted table, column and
plot line is labelled as a prediction. `render_tables` gives the markdown tables alone, for the
README.

Every figure carries where it came from: a result JSON's own "provenance" block (commit, dirty
flag, command, versions; see benchmarks.provenance), or, for files written before that block
existed, the entry for the file in `sources.json` of its results folder. That file also lists the
folder's raw logs (what each measures, its command and commit), which the report tabulates.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .scaling_model import (
    DS_CONFIG_DIR,
    GPU_COUNTS,
    Assumptions,
    Network,
    allreduce_busbw,
    complete_profiles,
    make_network,
    measured_efficiency,
    normalise_model,
    peak_for_device,
    predict_ds_configs,
    predict_grid,
    profiles_from_results,
    read_ds_configs,
    validate,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTIONS = ("throughput", "ablations", "scaling", "step")
SOURCES = "sources.json"


# ---------------------------------------------------------------------------------------------
# Reading results


def classify(result: Mapping[str, Any]) -> str:
    """ "scaling" (points / allreduce), "ablations" (Figure-4 rows: model "ablation" or names
    starting with "+"), "throughput" (other rows), "step" (benchmarks.step: "pretrain" and
    "finetune" rows) or "combined" (a dict of those sections)."""
    if "pretrain" in result and isinstance(result["pretrain"], list):
        return "step"
    convergence = "unigram_loss" in result or result.get("kind") == "convergence-summary"
    own = "convergence" if convergence else "convert" if "c4_en" in result else None
    if own:  # these benchmarks write their own report (convergence.md, convert.md) beside the JSON
        raise ValueError(f"a `bench {own}` result: its report is {own}.md, written by that benchmark")
    if any(k in result for k in SECTIONS) and "rows" not in result and "points" not in result:
        return "combined"
    if "points" in result or "allreduce" in result:
        return "scaling"
    rows = result.get("rows")
    if isinstance(rows, list):
        if result.get("kind") in ("ablations", "throughput"):
            return result["kind"]
        if any(r.get("model") == "ablation" or str(r.get("name", "")).startswith("+") for r in rows):
            return "ablations"
        return "throughput"
    raise ValueError("not a benchmark result: expected 'rows' (throughput, ablations) or 'points' (scaling)")


def merge_results(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections by kind; rows (and scaling points) of several files of one kind are concatenated."""
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        kind = classify(result)
        parts = result.items() if kind == "combined" else [(kind, result)]
        for section, value in parts:
            if section not in SECTIONS or not value:
                continue
            if section not in out:
                out[section] = json.loads(json.dumps(value))
                continue
            for key in ("rows", "points", "allreduce", "pretrain", "finetune"):
                if key in value:
                    out[section].setdefault(key, []).extend(value[key])
            for key, v in value.items():
                out[section].setdefault(key, v)
    return out


def load_results(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Read and merge result JSON files (see `merge_results`)."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a result JSON: {err}") from None
    return merge_results(results)


def find_sources(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, parsed sources.json) of the results folder holding `path` (its folder or the one above)."""
    here = Path(path).resolve().parent
    for folder in (here, here.parent):
        if (folder / SOURCES).is_file():
            try:
                return folder, json.loads((folder / SOURCES).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{folder / SOURCES}: not JSON: {err}") from None
    return None


def input_provenance(path: str | Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """Commit, dirty flag, command and environment of one result file: its own "provenance" block,
    else its entry in the folder's sources.json; "unknown" where neither says."""
    found = find_sources(path)
    name = Path(path).name
    if found:
        folder, sources = found
        name = Path(path).resolve().relative_to(folder).as_posix()
    prov = result.get("provenance")
    if prov:
        v = prov.get("versions") or {}
        env = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "triton", "deepspeed", "transformers") if v.get(k))
        return {
            "file": name,
            "commit": prov.get("commit"),
            "dirty": prov.get("dirty"),
            "command": prov.get("command"),
            "environment": f"{prov.get('device') or result.get('device', '?')}; {env}",
            "from": "the JSON",
        }
    if found:
        entry = next((s for s in sources.get("sources", []) if name in s.get("files", [])), None)
        if entry:
            env = sources.get("environment", {})
            return {
                "file": name,
                "commit": entry.get("commit"),
                "dirty": None,
                "command": entry.get("command"),
                "environment": "; ".join(str(v) for v in env.values()),
                "code": entry.get("code"),
                "from": SOURCES,
            }
    return {"file": name, "commit": None, "dirty": None, "command": None, "environment": None, "from": "unknown"}


# ---------------------------------------------------------------------------------------------
# The report as data


def _with_baseline_ratio(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r.get("name"): r for r in rows}
    out = []
    for r in rows:
        base = by_name.get(r.get("baseline"))
        ratio = (
            r["real_tokens_per_sec"] / base["real_tokens_per_sec"]
            if base and base is not r and base.get("real_tokens_per_sec")
            else None
        )
        out.append({**r, "ratio_to_baseline": ratio})
    return out


def _ablation_steps(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        prev, first = rows[i - 1] if i else None, rows[0]
        out.append(
            {
                **r,
                "ratio_to_previous": r["real_tokens_per_sec"] / prev["real_tokens_per_sec"] if prev else None,
                "ratio_to_first": r["real_tokens_per_sec"] / first["real_tokens_per_sec"],
            }
        )
    return out


def _with_step_ratio(
    rows: Sequence[Mapping[str, Any]], baseline: str = "hf-bert sdpa compiled"
) -> list[dict[str, Any]]:
    base = next((r for r in rows if r.get("config") == baseline), None)
    return [
        {
            **r,
            "ratio_to_baseline": r["real_tokens_per_sec"] / base["real_tokens_per_sec"]
            if base and r.get("real_tokens_per_sec")
            else None,
            "baseline": baseline if base else None,
        }
        for r in rows
    ]


def _measured_cost(report: Mapping[str, Any], assumptions: Assumptions) -> list[dict[str, Any]]:
    """Hours and cost of the full sample budget at measured throughput (1-GPU trainer rows and the
    one-host scaling points), at the assumed price."""
    out = []
    for r in report.get("throughput") or []:
        if r.get("samples_per_sec") and (r.get("world_size") or 1) == 1 and r.get("model"):
            out.append({"what": r["name"], "gpus": 1, "samples_per_sec": r["samples_per_sec"]})
    for p in (report.get("scaling") or {}).get("points", []):
        if p.get("step_time_sec"):
            out.append(
                {
                    "what": f"{p.get('mode', '?')} scaling, global batch {p['global_batch']:,}",
                    "gpus": p["world_size"],
                    "samples_per_sec": p["global_batch"] / p["step_time_sec"],
                }
            )
    for c in out:
        c["train_hours"] = assumptions.run_samples / c["samples_per_sec"] / 3600
        c["gpu_hours"] = c["train_hours"] * c["gpus"]
        c["cost_usd"] = c["gpu_hours"] * assumptions.price_per_gpu_hour
    return out


def build_report(
    results: Mapping[str, Mapping[str, Any]],
    network: Network | None = None,
    assumptions: Assumptions | None = None,
    *,
    config_dir: str | Path = DS_CONFIG_DIR,
    date: str | None = None,
    provenance: Sequence[Mapping[str, Any]] = (),
    sources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict: the inputs, measured tables with
    derived ratios and efficiencies, and (given single-GPU timings) the scaling model's
    predictions for every ds_config, its prediction lines for the plots and its validation.
    `provenance`: one `input_provenance` dict per input file; `sources`: the folder's
    sources.json (its raw files are listed in the report)."""
    throughput, ablations, scaling, step = (results.get(k) for k in SECTIONS)
    device = next(
        (r["device"] for r in (throughput, scaling, ablations, step) if r and r.get("device")), "unknown device"
    )
    assumptions = assumptions or Assumptions(peak_flops=peak_for_device(device))
    network = network or make_network(allreduce=(scaling or {}).get("allreduce"))
    report: dict[str, Any] = {
        "device": device,
        "date": date or dt.date.today().isoformat(),
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "assumptions": asdict(assumptions),
        "network": asdict(network),
        "inputs": {k: v for k, v in results.items() if v},
        "throughput": _with_baseline_ratio(throughput["rows"]) if throughput and throughput.get("rows") else None,
        "ablations": _ablation_steps(ablations["rows"]) if ablations and ablations.get("rows") else None,
        "scaling": None,
        "profiles": None,
        "predictions": None,
        "grid": None,
        "validation": None,
        "provenance": [dict(p) for p in provenance],
        "sources": dict(sources) if sources else None,
        "step": {regime: _with_step_ratio(step.get(regime) or []) for regime in ("pretrain", "finetune")}
        if step
        else None,
    }
    if scaling:
        report["scaling"] = {
            "points": measured_efficiency(scaling.get("points", [])),
            "allreduce": [
                {**a, "busbw_gbs": (allreduce_busbw(a) or math.nan) / 1e9} for a in scaling.get("allreduce", [])
            ],
        }
    profiles = profiles_from_results(scaling, throughput)  # scaling first: it separates the optimizer
    if profiles:
        runs = read_ds_configs(config_dir)
        profiles = complete_profiles(profiles, {r.model for r in runs})
        report["profiles"] = {m: p.to_dict() for m, p in profiles.items()}
        report["predictions"] = [asdict(p) for p in predict_ds_configs(profiles, network, assumptions, runs)]
        micro = {r.model: r.micro_batch for r in runs}
        report["grid"] = {
            m: predict_grid(profiles[m], network, assumptions, micro_batch=micro[m]) for m in sorted(micro)
        }
    if scaling and scaling.get("compute_sec_per_micro") and scaling.get("points"):
        report["validation"] = validate(scaling, network, assumptions)
    report["measured_cost"] = _measured_cost(report, assumptions)
    return report


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{format(value, spec)}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one letter (l/r) per column, default l then r."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        [
            "configuration",
            "model",
            "micro",
            "real tokens/s",
            "samples/s",
            "step s",
            "MFU (paper)",
            "MFU (exact)",
            "peak GiB",
            "vs baseline",
        ],
        [
            [
                r["name"],
                r.get("model", "-"),
                r.get("micro_batch", "-"),
                _f(r.get("real_tokens_per_sec")),
                _f(r.get("samples_per_sec")),
                _f(r.get("step_time_sec"), ".4f"),
                _f(r.get("mfu"), ".1%"),
                _f(r.get("mfu_exact"), ".1%"),
                _f(r.get("peak_mem_gib"), ".1f"),
                f"{r['ratio_to_baseline']:.2f}x {r['baseline']}" if r.get("ratio_to_baseline") else "-",
            ]
            for r in rows
        ],
        "llrrrrrrrl",
    )


def step_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        ["configuration", "step ms", "real tokens/s", "MFU (paper)", "peak GiB", "vs baseline"],
        [
            [
                r["config"],
                _f(r.get("step_ms"), ".2f"),
                _f(r.get("real_tokens_per_sec")),
                _f(r.get("mfu"), ".1%"),
                _f(r.get("peak_mem_gib"), ".1f"),
                f"{r['ratio_to_baseline']:.2f}x {r['baseline']}" if r.get("ratio_to_baseline") else "-",
            ]
            for r in rows
        ],
        "lrrrrl",
    )


def ablation_table(rows: Sequence[Mapping[str, Any]]) -> str:
    first = rows[0]["name"] if rows else "first"
    return markdown_table(
        ["step", "real tokens/s", "samples/s", "MFU (paper)", "MFU (exact)", "peak GiB", "x previous", f"x {first}"],
        [
            [
                r["name"],
                _f(r.get("real_tokens_per_sec")),
                _f(r.get("samples_per_sec")),
                _f(r.get("mfu"), ".1%"),
                _f(r.get("mfu_exact"), ".1%"),
                _f(r.get("peak_mem_gib"), ".1f"),
                _f(r.get("ratio_to_previous"), ".2f", "x"),
                _f(r.get("ratio_to_first"), ".2f", "x"),
            ]
            for r in rows
        ],
    )


def scaling_table(points: Sequence[Mapping[str, Any]]) -> str:
    rows = sorted(points, key=lambda p: (p.get("mode", ""), p["world_size"]))
    return markdown_table(
        ["GPUs", "mode", "global batch", "micro x accum", "real tokens/s", "step s", "MFU", "efficiency"],
        [
            [
                p["world_size"],
                p.get("mode", "-"),
                _f(p.get("global_batch")),
                f"{p.get('micro_batch', '-')} x {p.get('accumulation', '-')}",
                _f(p.get("real_tokens_per_sec")),
                _f(p.get("step_time_sec"), ".4f"),
                _f(p.get("mfu"), ".1%"),
                _f(p.get("efficiency"), ".1%"),
            ]
            for p in rows
        ],
        "rlrrrrrr",
    )


def allreduce_table(entries: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        ["GPUs", "dtype", "message MB", "seconds", "busbw GB/s"],
        [
            [
                a["world_size"],
                a.get("dtype", "-"),
                _f(a.get("bytes", 0) / 1e6, ",.1f"),
                _f(a.get("seconds"), ".5f"),
                _f(a.get("busbw_gbs")),
            ]
            for a in entries
        ],
        "rlrrr",
    )


def prediction_table(predictions: Sequence[Mapping[str, Any]]) -> str:
    """Predicted rows side by side: no overlap (what DeepSpeed does for these configs) | overlap (what-if)."""
    pairs: dict[str, dict[bool, Mapping[str, Any]]] = {}
    for p in predictions:
        pairs.setdefault(p["config"], {})[bool(p["overlap"])] = p
    rows = []
    for name, pair in pairs.items():
        p, o = pair.get(False), pair.get(True)
        if p is None:
            continue
        note = "" if p["compute_note"] == "measured" else f" ({p['compute_note']})"
        rows.append(
            [
                f"`{name}`{note}",
                p["gpus"],
                _f(p["global_batch"]),
                f"{p['micro_batch']} x {p['accumulation']}",
                p["path"],
                _f(p["busbw_gbs"]),
                _f(p["comm_exposed_sec"] * 1e3, ".1f"),
                _f(p["step_time_sec"], ".4f"),
                _f(p["tokens_per_sec"]),
                _f(p["samples_per_sec"]),
                _f(p["mfu"], ".1%"),
                _f(p["train_hours"], ".2f"),
                _f(p["cost_usd"]),
                _f(o["step_time_sec"], ".4f") if o else "-",
                _f(o["tokens_per_sec"]) if o else "-",
                _f(o["mfu"], ".1%") if o else "-",
                _f(o["cost_usd"], ",.0f") if o else "-",
            ]
        )
    return markdown_table(
        [
            "config",
            "GPUs",
            "global batch",
            "micro x accum",
            "wrapper",
            "busbw GB/s",
            "exposed comm ms",
            "step s",
            "tokens/s",
            "samples/s",
            "MFU",
            "hours",
            "cost $",
            "overlap: step s",
            "overlap: tokens/s",
            "overlap: MFU",
            "overlap: cost $",
        ],
        rows,
        "lrrrlrrrrrrrrrrrr",
    )


def validation_table(validation: Mapping[str, Any]) -> str:
    return markdown_table(
        [
            "GPUs",
            "mode",
            "global batch",
            "measured tokens/s",
            "predicted tokens/s",
            "error",
            "busbw GB/s used",
            f"within {validation['target']:.0%}",
        ],
        [
            [
                r["world_size"],
                r["mode"],
                _f(r["global_batch"]),
                _f(r["measured_tokens_per_sec"]),
                _f(r["predicted_tokens_per_sec"]),
                _f(r["error"], "+.1%"),
                _f(r.get("busbw_gbs")),
                "yes" if r["within_target"] else "NO",
            ]
            for r in validation["points"]
        ],
        "rlrrrrrl",
    )


def cost_table(
    measured: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]] | None, price: float
) -> str:
    rows = [
        [
            c["what"],
            "measured",
            c["gpus"],
            _f(c["samples_per_sec"]),
            _f(c["train_hours"], ".2f"),
            _f(c["gpu_hours"], ",.1f"),
            _f(c["cost_usd"]),
        ]
        for c in measured
    ]
    rows += [
        [
            f"`{p['config']}`" + ("" if p["compute_note"] == "measured" else f" ({p['compute_note']})"),
            "predicted, no overlap",
            p["gpus"],
            _f(p["samples_per_sec"]),
            _f(p["train_hours"], ".2f"),
            _f(p["gpu_hours"], ",.1f"),
            _f(p["cost_usd"]),
        ]
        for p in predictions or []
        if not p["overlap"]
    ]
    return markdown_table(
        ["run", "basis", "GPUs", "samples/s", "hours", "GPU-hours", f"cost at ${price:g}/GPU-h"], rows, "llrrrrr"
    )


def _commit(c: str | None, dirty: bool | None = None) -> str:
    return "-" if not c else f"`{c[:7]}`" + (" (dirty tree)" if dirty else "")


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text else "-"


def provenance_table(inputs: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        ["input", "commit", "command", "environment", "provenance from"],
        [
            [
                f"[{p['file']}]({p['file']})",
                _commit(p.get("commit"), p.get("dirty")) + (f"; code: {p['code']}" if p.get("code") else ""),
                _code(p.get("command") or ""),
                p.get("environment") or "-",
                p.get("from", "-"),
            ]
            for p in inputs
        ],
        "lllll",
    )


def sources_table(sources: Mapping[str, Any]) -> str:
    rows = []
    for s in sources.get("sources", []):
        files = ", ".join(f"[{Path(f).name}]({f})" for f in s.get("files", []))
        commit = _commit(s.get("commit")) + (f"; code: {s['code']}" if s.get("code") else "")
        rows.append([files, s.get("measures", "-"), _code(s.get("command", "")), commit])
    return markdown_table(["file", "what it measures", "command", "commit"], rows, "llll")


def render_tables(report: Mapping[str, Any]) -> dict[str, str]:
    """The report's markdown tables by section (only the sections with data), for the README."""
    out: dict[str, str] = {}
    for regime, rows in (report.get("step") or {}).items():
        if rows:
            out[f"step_{regime}"] = step_table(rows)
    if report.get("throughput"):
        out["throughput"] = throughput_table(report["throughput"])
    if report.get("ablations"):
        out["ablations"] = ablation_table(report["ablations"])
    if report.get("scaling"):
        if report["scaling"]["points"]:
            out["scaling"] = scaling_table(report["scaling"]["points"])
        if report["scaling"]["allreduce"]:
            out["allreduce"] = allreduce_table(report["scaling"]["allreduce"])
    if report.get("validation"):
        out["validation"] = validation_table(report["validation"])
    if report.get("predictions"):
        out["predictions"] = prediction_table(report["predictions"])
    if report.get("measured_cost") or report.get("predictions"):
        out["cost"] = cost_table(
            report.get("measured_cost") or [], report.get("predictions"), report["assumptions"]["price_per_gpu_hour"]
        )
    if report.get("provenance"):
        out["provenance"] = provenance_table(report["provenance"])
    if report.get("sources") and report["sources"].get("sources"):
        out["sources"] = sources_table(report["sources"])
    return out


def describe_model(report: Mapping[str, Any]) -> list[str]:
    """The scaling model's inputs as bullet lines."""
    a, n = report["assumptions"], report["network"]
    lines = [
        f"- network: {n['gpus_per_node']} GPUs per node; intra-node all-reduce bus bandwidth "
        f"{n['intra_busbw'] / 1e9:,.0f} GB/s ({n['intra_source']}); inter-node {n['name']}: "
        f"{n['inter_node_bw'] * 8 / 1e9:,.0f} Gb/s per node x efficiency {n['efficiency']:g}; latency per ring step "
        f"{n['intra_latency'] * 1e6:g} us in a node, {n['inter_latency'] * 1e6:g} us across nodes",
        f"- real tokens per sample {a['tokens_per_sample'] or 'from the measurement (else 0.88 x 128)'}; peak "
        f"{a['peak_flops'] / 1e12:g} TFLOP/s per GPU; ${a['price_per_gpu_hour']:g} per GPU-hour; "
        f"{a['run_samples']:,} samples per run",
        f"- backward share of a micro batch {a['backward_fraction']:.2f} (overlap columns); share of the "
        f"optimizer step that ZeRO-1 does not shard {a['optimizer_full_fraction']:g}; "
        f"scalar all-reduces per step: {a['scalar_collectives']}",
    ]
    for model, p in (report.get("profiles") or {}).items():
        micro = ", ".join(f"{s * 1e3:.1f} ms at micro {m}" for m, s in p["micro_sec"].items())
        lines.append(
            f"- {model} ({p['params'] / 1e6:.1f}M parameters): {micro}; optimizer step "
            f"{p['optimizer_sec'] * 1e3:.2f} ms on one GPU ({p['source']})"
        )
    return lines


def source_line(report: Mapping[str, Any], section: str) -> str:
    """ "Measured by ..." for the input files of one section (empty when unknown)."""
    parts = [
        f"[{p['file']}]({p['file']}) at commit {_commit(p.get('commit'), p.get('dirty'))}"
        + (f" (code: {p['code']})" if p.get("code") else "")
        + (f", `{p['command']}`" if p.get("command") else "")
        for p in report.get("provenance") or []
        if p.get("section") == section
    ]
    return ("Measured by " + "; ".join(parts) + ".") if parts else ""


def render_markdown(report: Mapping[str, Any], images: Sequence[str] = ()) -> str:
    """The whole report.md."""
    tables = render_tables(report)
    out = [
        f"# Benchmarks: {report['device']}, {report['date']}",
        "",
        "Measured sections come from the benchmark JSON in `report.json` (`inputs`). Sections marked "
        "PREDICTED come from the scaling model (`benchmarks/scaling_model.py`): they are estimates, not "
        "measurements.",
        "",
    ]

    def section(title: str, key: str, text: str = "") -> None:
        src = source_line(report, key) if key in tables else ""
        out.extend([f"## {title}", ""] + ([text, ""] if text else []) + ([src, ""] if src else []))
        out.extend([tables[key], ""] if key in tables else ["Not measured in this run.", ""])

    if "step_pretrain" in tables:
        out.extend(
            [
                "## Training step without DeepSpeed (measured, 1 GPU)",
                "",
                "benchmarks.step: forward, backward and fused AdamW on one GPU; pretraining regime: sequence "
                "length 128, C4-like lengths; finetuning regime: max length 256, mean about 64 real tokens.",
                "",
                *([source_line(report, "step"), ""] if source_line(report, "step") else []),
                tables["step_pretrain"],
                "",
            ]
        )
        if "step_finetune" in tables:
            out.extend(["Finetuning regime:", "", tables["step_finetune"], ""])
    section(
        "Trainer throughput (measured, 1 GPU)",
        "throughput",
        "The DeepSpeed trainer (bf16, ZeRO-1, fused AdamW) on synthetic C4-like batches; real tokens exclude "
        "padding. MFU (paper) = 6 x params x tokens/s / peak (Appendix H); MFU (exact) counts every matmul.",
    )
    section(
        "Figure 4 ablations (measured, 1 GPU)",
        "ablations",
        "Each row adds one MosaicBERT change to BERT-Base, in the paper's order.",
    )
    section(
        "Scaling on one host (measured)",
        "scaling",
        "Weak: per-GPU batch fixed; strong: global batch fixed. Efficiency = tokens/s / (GPUs x the same "
        "mode's 1-GPU tokens/s).",
    )
    if "allreduce" in tables:
        out.extend(
            [
                "### All-reduce bus bandwidth (measured)",
                "",
                "busbw = 2 (n-1)/n x bytes / seconds.",
                "",
                tables["allreduce"],
                "",
            ]
        )
    v = report.get("validation")
    verdict = ""
    if v and v.get("max_abs_error_multi_gpu") is not None:
        verdict = (
            f"Largest error on the multi-GPU points: {v['max_abs_error_multi_gpu']:.1%} "
            f"(target {v['target']:.0%}: {'met' if v['within_target'] else 'NOT met'})."
        )
    section(
        "Scaling model against the measured points",
        "validation",
        "Each measured point PREDICTED from the single-GPU compute and optimizer times and the measured "
        "all-reduce bandwidth (intra-node only). " + verdict,
    )
    if report.get("predictions"):
        out.extend(
            [
                "## Multinode throughput for every ds_config (PREDICTED, not measured)",
                "",
                "DeepSpeed 0.19 runs these configs without overlap (BF16_Optimizer all-reduces the gradients "
                "after the last backward, then all-gathers the bf16 parameters; LAMB files all-reduce fp32 "
                "gradients): the main columns are the prediction. The overlap columns are a what-if with the "
                "all-reduce hidden behind the last micro batch's backward. Rows marked estimate use a timing "
                "scaled from another model or micro batch, not a measurement of that model.",
                "",
                *describe_model(report),
                "",
                tables["predictions"],
                "",
            ]
        )
    section(
        "Cost of the full run",
        "cost",
        f"{report['assumptions']['run_samples']:,} samples (the paper's 70,000 steps x 4096) at "
        f"${report['assumptions']['price_per_gpu_hour']:g} per GPU-hour; cost = hours x GPUs x price.",
    )
    if images:
        out.extend(["## Plots", ""] + [f"![{Path(i).stem}]({Path(i).name})" for i in images] + [""])
    if "provenance" in tables:
        src = report.get("sources") or {}
        made = f" This report: `{src['report_command']}`." if src.get("report_command") else ""
        out.extend(
            [
                "## Where the measured tables come from",
                "",
                "Commit, command and environment of each input file: from the file's own provenance block "
                f"where it has one, else from `{SOURCES}` (derived from the git history).{made}",
                "",
                tables["provenance"],
                "",
            ]
        )
    if "sources" in tables:
        env = "; ".join(str(v) for v in (report["sources"].get("environment") or {}).values())
        out.extend(
            [
                "## Raw measurements in this folder",
                "",
                "Each file is named `<what>_<commit>[_<variant>]`: the commit that recorded it, and where "
                "the measured code differs from that commit (an experiment that was not kept, a parent), "
                f"the commit column says so. Every command runs from the repository root. Environment: {env}.",
                "",
                tables["sources"],
                "",
            ]
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plots


def _measured_points(report: Mapping[str, Any], model: str) -> list[Mapping[str, Any]]:
    scaling = report.get("inputs", {}).get("scaling") or {}
    if not report.get("scaling") or normalise_model(scaling.get("model", "base")) != model:
        return []
    return report["scaling"]["points"]


def plot_scaling(report: Mapping[str, Any], path: str | Path, metric: str = "tokens_per_sec") -> Path | None:
    """Predicted lines (solid: no overlap, dashed: overlap what-if) per global batch against GPU
    count, one panel per model, with the measured one-host points on top."""
    if not report.get("grid"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["grid"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, line in enumerate(report["grid"][model]):
            color = f"C{i}"
            for overlap, style in ((False, "-"), (True, "--")):
                pts = [p for p in line["points"] if p["overlap"] == overlap]
                ax.plot(
                    [p["gpus"] for p in pts],
                    [p[metric] for p in pts],
                    style,
                    color=color,
                    label=f"{line['label']} (predicted)" if not overlap else None,
                    alpha=1 if not overlap else 0.6,
                )
                guessed = [p for p in pts if p["compute_note"] not in ("measured", "interpolated")]
                ax.scatter(
                    [p["gpus"] for p in pts if p not in guessed],
                    [p[metric] for p in pts if p not in guessed],
                    color=color,
                    s=12,
                )
                ax.scatter(
                    [p["gpus"] for p in guessed],
                    [p[metric] for p in guessed],
                    s=22,
                    facecolors="white",
                    edgecolors=color,
                    zorder=4,
                )
        measured = _measured_points(report, model)
        key = "real_tokens_per_sec" if metric == "tokens_per_sec" else "mfu"
        for mode, marker in (("weak", "o"), ("strong", "s")):
            pts = [p for p in measured if p.get("mode") == mode and p.get(key)]
            if pts:
                ax.scatter(
                    [p["world_size"] for p in pts],
                    [p[key] for p in pts],
                    marker=marker,
                    s=60,
                    facecolors="none",
                    edgecolors="black",
                    zorder=5,
                    label=f"measured, {mode} scaling",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(GPU_COUNTS, [str(n) for n in GPU_COUNTS])
        if metric == "tokens_per_sec":
            ax.set_yscale("log")
            ax.set_ylabel("real tokens/s")
        else:
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.set_ylabel("MFU (6 x params x tokens/s / peak)")
        ax.set_xlabel("GPUs")
        ax.set_title(
            f"MosaicBERT-{model}: predicted lines (dashed: overlap what-if; hollow dots: compute time\n"
            f"extrapolated or scaled, not measured), measured points (black)",
            fontsize=8,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}: {'throughput' if metric == 'tokens_per_sec' else 'MFU'} vs GPU count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_ablations(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bars of real tokens/s and MFU per Figure-4 ablation step (measured)."""
    rows = report.get("ablations")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax1.bar(range(len(rows)), [r["real_tokens_per_sec"] for r in rows], color="C0")
    ax1.set_ylabel("real tokens/s")
    ax2.bar(range(len(rows)), [r.get("mfu") or 0 for r in rows], color="C1", label="MFU (paper)")
    if any(r.get("mfu_exact") for r in rows):
        ax2.plot(range(len(rows)), [r.get("mfu_exact") or math.nan for r in rows], "kD", label="MFU (exact)")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax2.set_ylabel("MFU")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{report['device']}: Figure 4 ablations (measured, 1 GPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The folder


def hardware_slug(device: str) -> str:
    """ "NVIDIA H200" -> "nvidia-h200": a folder-name-safe form of the device name."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def run_folder(hardware: str, date: str | None = None, root: str | Path = RESULTS_DIR) -> Path:
    """`<root>/<hardware>_<date>`, e.g. benchmarks/results/nvidia-h200_2025-06-01."""
    return Path(root) / f"{hardware_slug(hardware)}_{date or dt.date.today().isoformat()}"


def _finite(value: Any) -> Any:
    """NaN and infinities as null: report.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write report.md, report.json and the plots that have data; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [
        p
        for p in (
            plot_scaling(report, out / "scaling_tokens.png", "tokens_per_sec"),
            plot_scaling(report, out / "scaling_mfu.png", "mfu"),
            plot_ablations(report, out / "ablations.png"),
        )
        if p
    ]
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report, [p.name for p in images]))
    return [out / "report.md", out / "report.json", *images]
