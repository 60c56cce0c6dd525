"""`mosaicbert-ds bench SUBCOMMAND`: run a benchmark, predict multinode throughput, write a report.

    mosaicbert-ds bench attention [ARGS]    python -m benchmarks.attention ARGS
    mosaicbert-ds bench step [ARGS]         python -m benchmarks.step ARGS
    mosaicbert-ds bench throughput [ARGS]   python -m benchmarks.throughput ARGS
    mosaicbert-ds bench ablations [ARGS]    python -m benchmarks.throughput --ablations ARGS
    mosaicbert-ds bench scaling [ARGS]      python -m benchmarks.scaling ARGS (1 GPU, or --merge;
                                            N GPUs: under the deepspeed launcher, see its doc)
    mosaicbert-ds bench tiling [ARGS]       python -m benchmarks.fused_tiling ARGS
    mosaicbert-ds bench matmuls [ARGS]      python -m benchmarks.matmuls ARGS
    mosaicbert-ds bench profile [ARGS]      python -m benchmarks.profile_step ARGS
    mosaicbert-ds bench profile-trainer     python -m benchmarks.profile_trainer ARGS (the real trainer)
    mosaicbert-ds bench dropout-cost [ARGS] python -m benchmarks.dropout_cost ARGS
    mosaicbert-ds bench convergence [ARGS]  python -m benchmarks.convergence ARGS (time to loss)
    mosaicbert-ds bench convert [ARGS]      python -m benchmarks.convert ARGS (CPU: convert vs writers)
    mosaicbert-ds bench model --from scaling.json [throughput.json] [network options]
    mosaicbert-ds bench model --compute-sec-per-micro 0.03 --micro 128 --optimizer-sec 0.004
    mosaicbert-ds bench report [step.json] throughput.json ablations.json scaling.json [--hardware h200]

`model` prints the scaling model's predicted table for every ds_config (and, given a scaling JSON
with points, its error against them); `report` writes benchmarks/results/<hardware>_<date>/
(report.md, report.json, plots), taking each input's commit, command and environment from the
JSON's provenance block or from the folder's sources.json, and listing the raw files that
sources.json describes. Add -h after a subcommand for its options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mosaicbert_ds.errors import UserError

if TYPE_CHECKING:
    from .scaling_model import Assumptions, Network

# subcommand -> (module run as `python -m`, arguments put before the user's); one line per
# subcommand. Names are written as in the repository (`benchmarks.X`); `qualified` maps them to
# the installed package.
RUNNERS: dict[str, tuple[str, list[str]]] = {
    "attention": ("benchmarks.attention", []),
    "step": ("benchmarks.step", []),
    "throughput": ("benchmarks.throughput", []),
    "ablations": ("benchmarks.throughput", ["--ablations"]),
    "scaling": ("benchmarks.scaling", []),
    "tiling": ("benchmarks.fused_tiling", []),
    "matmuls": ("benchmarks.matmuls", []),
    "profile": ("benchmarks.profile_step", []),
    "profile-trainer": ("benchmarks.profile_trainer", []),
    "dropout-cost": ("benchmarks.dropout_cost", []),
    "convergence": ("benchmarks.convergence", []),
    "convert": ("benchmarks.convert", []),
}
LOCAL = ("model", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One positional plus REMAINDER: argparse subparsers cannot forward "--flag" arguments.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument(
        "subcommand", choices=[*RUNNERS, *LOCAL], metavar="SUBCOMMAND", help=f"one of {', '.join([*RUNNERS, *LOCAL])}"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the subcommand")


def qualified(module: str) -> str:
    """RUNNERS name under the package this file was imported as: `benchmarks.step` from the
    repository root, `mosaicbert_ds.benchmarks.step` when installed."""
    head, _, rest = module.partition(".")
    return f"{__package__}.{rest}" if head == "benchmarks" and __package__ and rest else module


def run_module(name: str, args: list[str]) -> int:
    """`python -m module [fixed args] args` in a subprocess; its exit code."""
    module, fixed = RUNNERS[name]
    module = qualified(module)
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise UserError(f"{module} is not in this checkout (bench {name} runs `python -m {module}`)")
    return subprocess.run([sys.executable, "-m", module, *fixed, *args]).returncode


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Network and assumption options shared by `model` and `report`."""
    from .scaling_model import DEFAULT_PRICE, INTER_PRESETS, INTRA_PRESETS, RUN_SAMPLES

    net = parser.add_argument_group("network (the scaling model's stated cluster)")
    net.add_argument(
        "--inter",
        choices=list(INTER_PRESETS),
        default="ib-8x400g",
        help="inter-node preset: " + "; ".join(f"{k}: {v.note}" for k, v in INTER_PRESETS.items()),
    )
    net.add_argument(
        "--intra",
        choices=list(INTRA_PRESETS),
        default="nvlink4",
        help="intra-node preset (nominal per-GPU bandwidth), used when no busbw is measured or given",
    )
    net.add_argument("--gpus-per-node", type=int, default=8)
    net.add_argument(
        "--intra-busbw",
        type=float,
        metavar="GB/s",
        help="achieved intra-node all-reduce bus bandwidth (default: measured, else preset x efficiency)",
    )
    net.add_argument("--inter-gbps-per-node", type=float, metavar="Gb/s", help="override the preset's node bandwidth")
    net.add_argument("--inter-gbps-per-gpu", type=float, metavar="Gb/s", help="per-GPU NIC bandwidth instead")
    net.add_argument("--inter-latency-us", type=float, help="latency per ring step across nodes (preset's by default)")
    net.add_argument("--intra-latency-us", type=float, default=2.0)
    net.add_argument("--efficiency", type=float, default=0.8, help="achieved fraction of nominal link bandwidth")
    assume = parser.add_argument_group("assumptions")
    assume.add_argument(
        "--tokens-per-sample",
        type=float,
        help="real tokens per sample (default: from the measurement, else 0.88 x 128)",
    )
    assume.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU (default: by device name, else 989)")
    assume.add_argument("--price", type=float, default=DEFAULT_PRICE, help="$ per GPU-hour")
    assume.add_argument("--samples", type=int, default=RUN_SAMPLES, help="samples in a full run")
    assume.add_argument("--backward-fraction", type=float, default=2 / 3)
    assume.add_argument("--optimizer-full-fraction", type=float, default=0.3)
    parser.add_argument("--configs", default=None, help="ds_configs folder (default: the repository's)")


def model_inputs(args: argparse.Namespace, scaling: dict | None, device: str | None) -> tuple[Network, Assumptions]:
    """(Network, Assumptions) from the options and, where not given, the measurement."""
    from .scaling_model import Assumptions, make_network, peak_for_device

    network = make_network(
        args.inter,
        args.intra,
        gpus_per_node=args.gpus_per_node,
        efficiency=args.efficiency,
        intra_busbw=args.intra_busbw * 1e9 if args.intra_busbw else None,
        allreduce=(scaling or {}).get("allreduce"),
        inter_bw_per_node=args.inter_gbps_per_node * 1e9 / 8 if args.inter_gbps_per_node else None,
        inter_bw_per_gpu=args.inter_gbps_per_gpu * 1e9 / 8 if args.inter_gbps_per_gpu else None,
        inter_latency=args.inter_latency_us * 1e-6 if args.inter_latency_us is not None else None,
        intra_latency=args.intra_latency_us * 1e-6,
    )
    assumptions = Assumptions(
        tokens_per_sample=args.tokens_per_sample,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else peak_for_device(device),
        price_per_gpu_hour=args.price,
        run_samples=args.samples,
        backward_fraction=args.backward_fraction,
        optimizer_full_fraction=args.optimizer_full_fraction,
    )
    return network, assumptions


def model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaicbert-ds bench model",
        description="Predicted multinode throughput, MFU and cost for every ds_config.",
    )
    parser.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=[],
        metavar="JSON",
        help="scaling and/or throughput JSON with single-GPU timings",
    )
    given = parser.add_argument_group("single-GPU timings on the command line (instead of --from)")
    given.add_argument("--compute-sec-per-micro", type=float, help="forward + backward of one micro batch, s")
    given.add_argument("--micro", type=int, default=128, help="the micro batch it was measured at")
    given.add_argument("--optimizer-sec", type=float, default=0.0, help="optimizer step on one GPU, s")
    given.add_argument("--model", default="base", help="model preset the timing is for (base, large)")
    given.add_argument("--params", type=int, help="parameter count (default: the preset's)")
    add_model_options(parser)
    parser.add_argument("--json", help="also write the predictions (and validation) here")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaicbert-ds bench report", description="Build a report folder (report.md, report.json, plots)."
    )
    parser.add_argument("results", nargs="+", help="result JSON files (throughput, ablations, scaling)")
    parser.add_argument("--out", help="the folder (default: <root>/<hardware>_<date>)")
    parser.add_argument("--hardware", help="folder name's hardware part (default: from the device name)")
    parser.add_argument("--date", help="folder name's date (default: today)")
    parser.add_argument("--root", default=None, help="parent of the run folders (default: benchmarks/results)")
    add_model_options(parser)
    return parser


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read a result JSON: {err}") from None


def run_model(argv: list[str]) -> int:
    from . import report as rep
    from .scaling_model import (
        DS_CONFIG_DIR,
        ComputeProfile,
        model_params,
        normalise_model,
        predict_ds_configs,
        profiles_from_results,
        read_ds_configs,
        validate,
    )

    args = model_parser().parse_args(argv)
    results = rep.merge_results(_load(p) for p in args.sources)
    scaling, throughput = results.get("scaling"), results.get("throughput")
    profiles = profiles_from_results(scaling, throughput)
    if args.compute_sec_per_micro:
        model = normalise_model(args.model)
        profiles[model] = ComputeProfile(
            model,
            args.params or model_params(model),
            args.optimizer_sec,
            ((args.micro, args.compute_sec_per_micro),),
            None,
            "measured: given on the command line",
        )
    if not profiles:
        raise UserError(
            "no single-GPU timing: pass --from scaling.json (or throughput.json), "
            "or --compute-sec-per-micro S --micro N --optimizer-sec S"
        )
    device = next((r.get("device") for r in (scaling, throughput) if r), None)
    network, assumptions = model_inputs(args, scaling, device)
    runs = read_ds_configs(args.configs or DS_CONFIG_DIR)
    predictions = predict_ds_configs(profiles, network, assumptions, runs)
    report = {
        "assumptions": asdict(assumptions),
        "network": asdict(network),
        "profiles": {m: p.to_dict() for m, p in profiles.items()},
        "predictions": [asdict(p) for p in predictions],
    }
    print("PREDICTED by the scaling model (benchmarks/scaling_model.py), not measured:")
    print("\n".join(rep.describe_model(report)) + "\n")
    print(rep.prediction_table(report["predictions"]))
    if scaling and scaling.get("points") and scaling.get("compute_sec_per_micro"):
        report["validation"] = validate(scaling, network, assumptions)
        print("\nthe model against the measured one-host points:\n")
        print(rep.validation_table(report["validation"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rep._finite(report), indent=1) + "\n")
    return 0


def run_report(argv: list[str]) -> int:
    from . import report as rep

    args = report_parser().parse_args(argv)
    for path in args.results:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    loaded = [_load(p) for p in args.results]
    results = rep.merge_results(loaded)
    provenance = [{**rep.input_provenance(p, r), "section": rep.classify(r)} for p, r in zip(args.results, loaded)]
    found = rep.find_sources(args.results[0])
    device = next((r.get("device") for r in results.values() if r.get("device")), "unknown device")
    network, assumptions = model_inputs(args, results.get("scaling"), device)
    kwargs = {"config_dir": args.configs} if args.configs else {}
    report = rep.build_report(
        results,
        network,
        assumptions,
        date=args.date,
        provenance=provenance,
        sources=found[1] if found else None,
        **kwargs,
    )
    root = {"root": args.root} if args.root else {}
    out = Path(args.out) if args.out else rep.run_folder(args.hardware or device, report["date"], **root)
    for path in rep.write_report(report, out):
        print(path)
    v = report.get("validation")
    if v and v.get("max_abs_error_multi_gpu") is not None:
        print(
            f"scaling model vs measured multi-GPU points: max error {v['max_abs_error_multi_gpu']:.1%} "
            f"(target {v['target']:.0%}: {'met' if v['within_target'] else 'NOT met'})"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    rest = list(args.args)
    try:
        if args.subcommand in RUNNERS:
            return run_module(args.subcommand, rest)
        if args.subcommand == "model":
            return run_model(rest)
        return run_report(rest)
    except ValueError as err:  # the model's own checks: bad inputs, not bugs
        raise UserError(str(err)) from None
