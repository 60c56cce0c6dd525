"""`mosaicbert-ds quickstart [OUT] [key=value ...]`: the main job on the bundled corpus, no download.

1. train a WordPiece tokenizer on the bundled Jargon File and convert it to MDS shards;
2. pretrain for a few minutes on whatever is here: the CPU (recipe quickstart-cpu), one GPU, or
   all GPUs through the deepspeed launcher (recipe quickstart-gpu);
3. write TensorBoard logs, metrics.jsonl and a checkpoint; export it as a transformers folder;
4. load the export with AutoModelForMaskedLM, fill a masked word, print a short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .folders import QUICKSTART_RUN, RUN_ENTRIES

QUICKSTART_VOCAB = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds quickstart                     # into runs/quickstart\n"
        "    mosaicbert-ds quickstart runs/qs duration.steps=50 --keep"
    )
    parser.add_argument("out", nargs="?", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart recipe")
    parser.add_argument("--keep", action="store_true", help="resume an earlier quickstart run instead of restarting")


def _pretrain(recipe: str, overrides: list[str], n_gpus: int) -> dict:
    if n_gpus > 1:  # every GPU here: one rank per GPU through DeepSpeed's launcher
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(n_gpus),
            "--no_local_rank",
            "--module",
            "mosaicbert_ds.cli",
            "pretrain",
            recipe,
            *overrides,
        ]
        subprocess.run(cmd, check=True)
        return {}
    from .train.pretrain import train
    from .train.run_config import load_run_config

    return train(load_run_config(recipe, overrides))


RUN_KIND = QUICKSTART_RUN


def check_start_over(run_dir: Path) -> None:
    """Refuse, before any work, what `start_over` would refuse: anything but an absent or empty
    folder, or an earlier quickstart's run folder holding only what a run writes there."""
    from .errors import UserError
    from .outputs import extra_entries, output_kind

    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"refusing to use {run_dir}: it is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if output_kind(run_dir) != RUN_KIND:
            raise UserError(
                f"refusing to replace {run_dir}: it is not a quickstart run folder; choose another "
                "OUT, remove it yourself, or pass --keep to resume a run there"
            )
        extras = extra_entries(run_dir)
        if extras is None:
            raise UserError(
                f"refusing to replace {run_dir}: its marker does not list what the quickstart wrote there "
                "(an older version made it); remove it yourself, choose another OUT, or pass --keep"
            )
        if extras:
            raise UserError(
                f"refusing to replace {run_dir}: it holds {', '.join(extras[:3])}, which the quickstart "
                "did not write; move them out, choose another OUT, or pass --keep to resume the run there"
            )


def start_over(run_dir: Path) -> None:
    """Remove an earlier quickstart's pretraining folder (marked as such, holding only what a run
    writes); refuse anything else that is not empty, so that nothing of the user's is deleted.
    Then mark the fresh folder with the entries a run writes (folders.RUN_ENTRIES)."""
    from .outputs import write_marker

    check_start_over(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, RUN_KIND, RUN_ENTRIES)


def check_outputs(out: Path, keep: bool) -> None:
    """Every output of the quickstart, before any work: OUT/data (a dataset), OUT/pretrain (a run
    folder: replaced, or resumed with --keep) and OUT/model (an export)."""
    from .data.default_corpus import check_default_corpus_destination
    from .folders import check_destination
    from .outputs import check_replaceable

    check_default_corpus_destination(out / "data", vocab_size=QUICKSTART_VOCAB)
    check_destination(out / "pretrain", "run")
    if not keep:
        check_start_over(out / "pretrain")
    check_replaceable(out / "model", "export", sources=[out / "pretrain" / "checkpoints"])


def main(args: argparse.Namespace) -> int:
    from .data import prepare_default_corpus

    out = Path(args.out)
    check_outputs(out, args.keep)
    n_gpus = torch.cuda.device_count()
    where = f"{n_gpus} GPU(s): {torch.cuda.get_device_name()}" if n_gpus else f"CPU ({os.cpu_count()} cores)"
    print(f"[1/4] tokenizer + MDS shards from the bundled Jargon File -> {out / 'data'}")
    # a vocabulary sized to the 1.7 MB corpus: with 8192 entries most pieces are too rare to learn in minutes
    data = prepare_default_corpus(out / "data", vocab_size=QUICKSTART_VOCAB, progress=True)
    run_dir = out / "pretrain"
    if not args.keep:
        start_over(run_dir)
    recipe = "quickstart-gpu" if n_gpus else "quickstart-cpu"
    print(f"[2/4] pretraining ({recipe}) on {where} -> {run_dir}")
    summary = _pretrain(recipe, [f"data.path={data}", f"output_dir={run_dir}", *args.overrides], n_gpus)
    if not summary:  # launched in other processes: read what rank 0 logged
        summary = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            summary.update(json.loads(line))
    print(f"[3/4] export -> {out / 'model'}")
    from .train.export import export_checkpoint

    model_dir = export_checkpoint(run_dir / "checkpoints", out / "model")
    print("[4/4] AutoModelForMaskedLM.from_pretrained on the export")
    from .data.unigram import unigram_loss
    from .held_out import format_predictions, held_out_predictions

    learned = held_out_predictions(model_dir, data)

    unigram = unigram_loss(data)

    def fmt(key: str, spec: str) -> str:
        value = summary.get(key)
        return format(value, spec) if value is not None else "n/a (no GPU peak known)"

    print("\nsummary")
    print(f"  hardware           {where}")
    print(f"  steps              {summary.get('step')}")
    print(f"  train loss         {fmt('loss/train', '.3f')}   (MLM accuracy {fmt('accuracy/train', '.3f')})")
    print(f"  eval loss          {fmt('loss/eval', '.3f')}   (MLM accuracy {fmt('accuracy/eval', '.3f')}, 15% masking)")
    print(
        f"  unigram baseline   {unigram:.3f}   (token frequencies alone; the eval loss below it is what the "
        f"model learned from context)"
    )
    from .flops import bare_step_reference

    reference = bare_step_reference()
    beside = ""
    if reference and summary.get("throughput/tokens_per_sec"):
        ratio = summary["throughput/tokens_per_sec"] / n_gpus / reference[0]
        beside = f"   ({ratio:.2f} of the bare step on this GPU, {reference[0]:,.0f} per GPU: {reference[1]})"
    print(f"  real tokens/s      {fmt('throughput/tokens_per_sec', ',.0f')}{beside}")
    print(f"  MFU (paper, App. H) {fmt('throughput/mfu', '.1%')}")
    print("\n".join(format_predictions(learned)))
    print(f"  TensorBoard        tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  checkpoint         {run_dir / 'checkpoints'}  (run again with --keep to resume)")
    print(f"  transformers model {model_dir}")
    return 0
