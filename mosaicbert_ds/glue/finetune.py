"""`mosaicbert-ds finetune-glue`: finetune a checkpoint on GLUE (dev) and report the average.

    # one process: CPU, or one GPU
    mosaicbert-ds finetune-glue MODEL --out runs/glue
    # plain torch DDP over the GPUs of one node (torchrun or the deepspeed launcher)
    torchrun --nproc_per_node 8 -m mosaicbert_ds.cli finetune-glue MODEL --out runs/glue
    # local GLUE files, three tasks, three seeds each, a smoke-sized run
    mosaicbert-ds finetune-glue MODEL --out o --data-dir glue_data --tasks rte,mrpc,stsb --seeds 3 \\
        --hparam epochs=1 --limit-train 200
    # the same run with key=value settings (finetune_config.py: every flag sets one of them)
    mosaicbert-ds finetune-glue MODEL --out o data.dir=glue_data tasks.names=rte,mrpc,stsb \\
        tasks.seeds=3 hparams.epochs=1 data.limit_train=200

MODEL is a transformers folder (MosaicBERT, or a plain Hugging Face BERT for the baseline) or a
trainer checkpoint (a folder with DeepSpeed's `latest`, exported once into OUT/pretrained).
Runs use the paper's per-task recipe (tasks.py), max length 256 (--max-length), and start RTE, MRPC and
STS-B from the MNLI-finetuned model, so MNLI runs first (and is added when they need it).
MosaicBERT trains on unpadded (cu_seqlens) batches, BERT on padded ones; bf16 autocast on
CUDA, fp32 on CPU; several processes use DistributedDataParallel (runtime.py). --cuda-graphs
(run.cuda_graphs=true) replays each training step as a CUDA graph on one GPU (glue/graphed_step.py).

OUT holds run.json (what the folder was made from), <task>/seed<N>/ (result.json once
finished, state.pt while running, model/ for MNLI), results.json and results.md. Re-running
with the same OUT skips finished seeds and resumes interrupted ones from their last state; a
multi-node run needs OUT on a shared filesystem. OUT is checked first: it can be written, and it is
not a run folder, a dataset, a checkpoint or a model folder, nor inside one (mosaicbert_ds.folders);
the model's weight files are checked before any task starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig

from ..errors import UserError
from ..folders import check_destination, check_location
from ..interop.folder import check_weight_files
from ..outputs import atomic_write_json, atomic_write_text
from .data import Examples, load_split, tokenize
from .finetune_config import FinetuneConfig, add_finetune_options, load_finetune_config
from .graphed_step import graphs_unsupported
from .models import (
    check_max_length,
    check_vocab,
    is_trainer_checkpoint,
    load_tokenizer,
    resolve_model_dir,
    trainer_state,
)
from .report import summarize, to_markdown
from .runtime import Runtime, setup_runtime
from .tasks import TASKS, Hparams, Task
from .trainer import MODEL_DIR, RESULT_FILE, Hooks, SeedRun, run_seed, schedule

RUN_FILE = "run.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds finetune-glue runs/base/hf --out runs/glue                 # all eight tasks\n"
        "    mosaicbert-ds finetune-glue runs/base/checkpoints --out runs/glue --tasks rte,mrpc,stsb --seeds 3\n"
        "    torchrun --nproc_per_node 8 -m mosaicbert_ds.cli finetune-glue runs/base/hf --out runs/glue\n"
        "    mosaicbert-ds finetune-glue runs/base/hf --out runs/glue tasks.names=rte hparams.rte.lr=2e-5\n"
        "\n"
        "GLUE tasks: " + ", ".join(TASKS)
    )
    parser.add_argument("model", help="transformers folder or trainer checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (re-use it to resume)")
    add_finetune_options(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_finetune_config(args.overrides, args, model=args.model, out=args.out)
    done = finetune_glue(cfg)
    if done["rank"] == 0:
        out = Path(cfg.out)
        print(to_markdown(done["summary"]))
        print(f"wrote {out / 'results.md'} and {out / 'results.json'}", file=sys.stderr)
    return 0


@dataclasses.dataclass
class _Plan:
    """What this invocation will do for one task."""

    task: Task
    hparams: Hparams
    seeds: list[int]
    pending: list[int]


def _log(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, file=sys.stderr)


def _read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}); delete it to redo that seed") from None


def _seed_dir(out: Path, task: Task, seed: int) -> Path:
    return out / task.name / f"seed{seed}"


def _init_dir(plan: dict[str, _Plan], task: Task, k: int, model_dir: Path, out: Path, mnli_start: bool) -> Path:
    """Seed k of a staged task starts from MNLI seed k mod n; everything else from the model."""
    if not (mnli_start and task.from_mnli):
        return model_dir
    mnli_seeds = plan["mnli"].seeds
    return _seed_dir(out, TASKS["mnli"], mnli_seeds[k % len(mnli_seeds)]) / MODEL_DIR


def _existing_results(out: Path, task: Task) -> list[dict[str, Any]]:
    folder = out / task.name
    if not folder.is_dir():
        return []
    results = [_read_result(p) for p in sorted(folder.glob(f"seed*/{RESULT_FILE}"))]
    return sorted(results, key=lambda r: r["seed"])


def _check_run_file(out: Path, meta: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    old = _read_result(path)
    for key, value in meta.items():
        if old.get(key) != value:
            raise UserError(f"{out} holds results made with {key}={old.get(key)!r}, not {value!r}; use another --out")


def finetune_glue(cfg: FinetuneConfig, hooks: Hooks | None = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Finetune cfg.model on the tasks into cfg.out; returns {"summary": results.json's content, "rank": r}.

    Every user error (task names, settings, data files, labels, model, vocabulary) is found
    before anything is written to cfg.out. `runtime` lets a caller that finetunes several
    checkpoints (pareto) keep one process group; by default this call sets one up and closes it.
    """
    cfg.validate()
    if not (cfg.model and cfg.out):
        raise UserError("finetuning needs a model and an output folder (--out)")
    model, out = Path(cfg.model).resolve(), Path(cfg.out).resolve()
    if not model.exists():
        raise UserError(f"model {model} does not exist")
    check_location(out, "--out")
    check_destination(out, "glue")
    graphs = cfg.use_cuda_graphs(
        runtime.device.type == "cuda" if runtime else torch.cuda.is_available(),
        runtime.world_size if runtime else int(os.environ.get("WORLD_SIZE", "1")),
    )
    data_dir = Path(cfg.data.dir) if cfg.data.dir else None
    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else None
    meta = {
        "model": str(model),
        "tokenizer": str(tokenizer.resolve()) if tokenizer else None,
        "data": str(data_dir.resolve()) if data_dir else "hub:nyu-mll/glue",
        "limit_train": cfg.data.limit_train,
        "limit_eval": cfg.data.limit_eval,
        "mnli_start": cfg.tasks.mnli_start,
        "pretrain_seconds": _pretrain_seconds(model),
    }
    _check_run_file(out, meta)

    # What is finished already (and made the same way), what is left to run.
    counts, recipe = cfg.seed_counts(), cfg.recipe()
    plans: dict[str, _Plan] = {}
    for task in cfg.task_list():
        task_seeds = [cfg.tasks.first_seed + k for k in range(counts[task.name])]
        hp, pending = recipe[task.name], []
        for seed in task_seeds:
            path = _seed_dir(out, task, seed) / RESULT_FILE
            if not path.is_file():
                pending.append(seed)
            elif _read_result(path).get("hparams") != dataclasses.asdict(hp):
                raise UserError(f"{path} was made with other hyperparameters; use another --out")
        plans[task.name] = _Plan(task, hp, task_seeds, pending)

    # Read every split the pending work needs now, so that a bad file fails before hours of MNLI.
    splits: dict[str, dict[str, Examples]] = {}
    for name, plan in plans.items():
        if plan.pending:
            splits[name] = {"train": load_split(plan.task, "train", data_dir, cfg.data.limit_train)}
            for _, split in plan.task.eval_splits:
                splits[name][split] = load_split(plan.task, split, data_dir, cfg.data.limit_eval)

    rt = runtime or setup_runtime(cfg.run.device)
    try:
        longest = max(plan.hparams.max_length for plan in plans.values())
        model_dir, tok = _prepare_model(model, out, tokenizer, rt, longest, graphs)
        if rt.is_main:
            atomic_write_json(out / RUN_FILE, meta)

        results: dict[str, list[dict[str, Any]]] = {}
        for name, plan in plans.items():
            results[name] = _run_task(cfg, plan, plans, splits.get(name), tok, model_dir, out, rt, hooks, graphs)
            _write_reports(out, results, meta, rt)
        for task in TASKS.values():  # finished tasks from earlier invocations stay in the table
            if task.name not in results:
                results[task.name] = _existing_results(out, task)
        summary = _write_reports(out, results, meta, rt)
        return {"summary": summary, "rank": rt.rank}
    finally:
        if runtime is None:
            rt.close()


def _pretrain_seconds(model: Path) -> float | None:
    """Training seconds of a trainer checkpoint (its trainer_state.json), for the results table."""
    seconds = trainer_state(model).get("train_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _prepare_model(
    model: Path, out: Path, tokenizer: Path | None, rt: Runtime, max_length: int, cuda_graphs: bool = False
) -> tuple[Path, Any]:
    """(transformers folder, tokenizer), vocabulary and max_length checked, and with cuda_graphs
    that the graphs can capture the model. A trainer checkpoint is exported into `out` first; when
    that export turns out unusable, a folder this call created is removed again."""
    created = not out.exists()
    try:
        if is_trainer_checkpoint(model):
            if rt.is_main:
                resolve_model_dir(model, out, is_main=True)
            rt.barrier()
        model_dir = resolve_model_dir(model, out, is_main=False)
        check_weight_files(model_dir)  # a truncated file fails here, not when the first task loads it
        tok = load_tokenizer(tokenizer or model_dir)
        check_vocab(model_dir, tok)
        check_max_length(model_dir, max_length)
        if cuda_graphs and (why := graphs_unsupported(AutoConfig.from_pretrained(str(model_dir)))):
            raise UserError(f"run.cuda_graphs=true (--cuda-graphs) cannot run: {why}")
        return model_dir, tok
    except UserError:
        if created and rt.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_task(
    cfg: FinetuneConfig,
    plan: _Plan,
    plans: dict[str, _Plan],
    splits: dict[str, Examples] | None,
    tok: Any,
    model_dir: Path,
    out: Path,
    rt: Runtime,
    hooks: Hooks | None,
    cuda_graphs: bool = False,
) -> list[dict[str, Any]]:
    task, hp = plan.task, plan.hparams
    if splits is None:
        _log(rt, f"{task.display}: all {len(plan.seeds)} seed(s) finished, skipped")
        return [_read_result(_seed_dir(out, task, s) / RESULT_FILE) for s in plan.seeds]
    train = tokenize(tok, splits["train"], hp.max_length)
    evals = {suffix: (split, tokenize(tok, splits[split], hp.max_length)) for suffix, split in task.eval_splits}
    _, per_seed_steps = schedule(len(train), hp, rt.world_size)
    bar = tqdm(
        total=per_seed_steps * len(plan.pending),
        desc=task.display,
        unit="step",
        dynamic_ncols=True,
        disable=not (cfg.run.progress and rt.is_main),
        file=sys.stderr,
    )
    try:
        for k, seed in enumerate(plan.seeds):
            seed_dir = _seed_dir(out, task, seed)
            if seed not in plan.pending:
                continue
            init = _init_dir(plans, task, k, model_dir, out, cfg.tasks.mnli_start)
            if not (init / "config.json").is_file():
                raise UserError(
                    f"{task.display} starts from {init}, which is missing; delete "
                    f"{init.parent / RESULT_FILE} to re-run that MNLI seed"
                )
            bar.set_description(f"{task.display} seed {seed}")
            run = SeedRun(task, seed, hp, init, seed_dir)
            result = run_seed(
                run,
                tok,
                train,
                evals,
                rt,
                save_every=cfg.run.save_every,
                eval_batch_size=cfg.run.eval_batch_size,
                save_model=task.name == "mnli",
                hooks=hooks,
                progress=bar,
                cuda_graphs=cuda_graphs,
            )
            bar.write(
                f"{task.display} seed {seed}: " + ", ".join(f"{key} {v:.2f}" for key, v in result["metrics"].items())
            )
    finally:
        bar.close()
    return [_read_result(_seed_dir(out, task, s) / RESULT_FILE) for s in plan.seeds]


def _write_reports(
    out: Path, results: dict[str, list[dict[str, Any]]], meta: dict[str, Any], rt: Runtime
) -> dict[str, Any]:
    summary = summarize(results, meta)
    if rt.is_main:
        atomic_write_json(out / "results.json", summary)
        atomic_write_text(out / "results.md", to_markdown(summary))
    rt.barrier()
    return summary
