"""`mosaicbert-ds finetune-glue`: finetune a checkpoint on GLUE (dev) and report the average.

    # one process: CPU, or one GPU
    mosaicbert-ds finetune-glue MODEL --out runs/glue
    # plain torch DDP over the GPUs of one node (torchrun or the deepspeed launcher)
    torchrun --nproc_per_node 8 -m mosaicbert_ds.cli finetune-glue MODEL --out runs/glue
    # local GLUE files, three tasks, three seeds each, a smoke-sized run
    mosaicbert-ds finetune-glue MODEL --out o --data-dir glue_data --tasks rte,mrpc,stsb --seeds 3 \\
        --hparam epochs=1 --limit-train 200

MODEL is a transformers folder (MosaicBERT, or a plain Hugging Face BERT for the baseline) or a
trainer checkpoint (a folder with DeepSpeed's `latest`, exported once into OUT/pretrained).
Runs use the paper's per-task recipe (tasks.py), max length 256 (--max-length), and start RTE, MRPC and
STS-B from the MNLI-finetuned model, so MNLI runs first (and is added when they need it).
MosaicBERT trains on unpadded (cu_seqlens) batches, BERT on padded ones; bf16 autocast on
CUDA, fp32 on CPU; several processes use DistributedDataParallel (runtime.py).

OUT holds run.json (what the folder was made from), <task>/seed<N>/ (result.json once
finished, state.pt while running, model/ for MNLI), results.json and results.md. Re-running
with the same OUT skips finished seeds and resumes interrupted ones from their last state; a
multi-node run needs OUT on a shared filesystem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from . import atomic
from .data import Examples, load_split, tokenize
from .models import check_max_length, check_vocab, is_trainer_checkpoint, load_tokenizer, resolve_model_dir
from .report import summarize, to_markdown
from .runtime import Runtime, setup_runtime
from .tasks import TASKS, Hparams, Task, apply_overrides, parse_seed_counts, parse_tasks
from .trainer import MODEL_DIR, RESULT_FILE, Hooks, SeedRun, run_seed, schedule

RUN_FILE = "run.json"


def add_finetune_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by finetune-glue and pareto."""
    parser.add_argument(
        "--tasks", default="all", help=f"comma-separated GLUE tasks ({','.join(TASKS)}), or 'all' (default)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="local GLUE TSV or JSONL files (DIR/MNLI/train.tsv ...); default: the hub's nyu-mll/glue",
    )
    parser.add_argument(
        "--seeds", default=None, help="seeds per task: N, or TASK=N,... (default: 1 for MNLI/QNLI/QQP, 5 for the rest)"
    )
    parser.add_argument("--first-seed", type=int, default=42, help="seed k of a task is FIRST_SEED + k")
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="[TASK.]KEY=VALUE",
        help="override the recipe, e.g. epochs=1 or rte.lr=2e-5 (repeatable)",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument(
        "--mnli-start",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start RTE, MRPC and STS-B from the MNLI-finetuned model (the paper's recipe)",
    )
    parser.add_argument(
        "--save-every", type=int, default=2000, help="save resumable state every N steps (0: only at the end)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example after truncation, every task (default: the recipe's 256; same as "
        "--hparam max_length=N; learned position embeddings must cover it, ALiBi models take any length)",
    )
    parser.add_argument(
        "--limit-train", type=int, default=None, help="use only the first N training examples (smoke runs)"
    )
    parser.add_argument("--limit-eval", type=int, default=None, help="use only the first N dev examples (smoke runs)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds finetune-glue runs/base/hf --out runs/glue                 # all eight tasks\n"
        "    mosaicbert-ds finetune-glue runs/base/checkpoints --out runs/glue --tasks rte,mrpc,stsb --seeds 3\n"
        "    torchrun --nproc_per_node 8 -m mosaicbert_ds.cli finetune-glue runs/base/hf --out runs/glue\n"
        "\n"
        "GLUE tasks: " + ", ".join(TASKS)
    )
    parser.add_argument("model", type=Path, help="transformers folder or trainer checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (re-use it to resume)")
    add_finetune_options(parser)


def finetune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of finetune_glue that add_finetune_options defines."""
    return dict(
        tasks=args.tasks,
        data_dir=args.data_dir,
        seeds=args.seeds,
        first_seed=args.first_seed,
        hparams=([f"max_length={args.max_length}"] if args.max_length is not None else []) + args.hparam,
        tokenizer=args.tokenizer,
        mnli_start=args.mnli_start,
        save_every=args.save_every,
        eval_batch_size=args.eval_batch_size,
        limit_train=args.limit_train,
        limit_eval=args.limit_eval,
        device=args.device,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    done = finetune_glue(args.model, args.out, **finetune_options(args))
    if done["rank"] == 0:
        print(to_markdown(done["summary"]))
        print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}", file=sys.stderr)
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


def _check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


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


def finetune_glue(
    model: Path,
    out: Path,
    *,
    tasks: str | list[str] = "all",
    data_dir: Path | None = None,
    seeds: str | int | None = None,
    first_seed: int = 42,
    hparams: list[str] | None = None,
    tokenizer: Path | None = None,
    mnli_start: bool = True,
    save_every: int = 2000,
    eval_batch_size: int = 128,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    device: str = "auto",
    hooks: Hooks | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Finetune `model` on the tasks into `out`; returns {"summary": results.json's content, "rank": r}.

    Every user error (task names, options, data files, labels, model, vocabulary) is found
    before anything is written to `out`. `runtime` lets a caller that finetunes several
    checkpoints (pareto) keep one process group; by default this call sets one up and closes it.
    """
    model, out = Path(model).resolve(), Path(out).resolve()
    task_list = parse_tasks(tasks)
    if mnli_start and any(t.from_mnli for t in task_list) and TASKS["mnli"] not in task_list:
        task_list = [TASKS["mnli"]] + task_list  # a dependency: trained (with its own seeds) and reported
    counts = parse_seed_counts(seeds, task_list)
    recipe = apply_overrides(hparams)
    _check_positive("--save-every", save_every, allow_zero=True)
    _check_positive("--eval-batch-size", eval_batch_size)
    _check_positive("--limit-train", limit_train)
    _check_positive("--limit-eval", limit_eval)
    if not model.exists():
        raise UserError(f"model {model} does not exist")
    meta = {
        "model": str(model),
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        "data": str(Path(data_dir).resolve()) if data_dir else "hub:nyu-mll/glue",
        "limit_train": limit_train,
        "limit_eval": limit_eval,
        "mnli_start": mnli_start,
        "pretrain_seconds": _pretrain_seconds(model),
    }
    _check_run_file(out, meta)

    # What is finished already (and made the same way), what is left to run.
    plans: dict[str, _Plan] = {}
    for task in task_list:
        task_seeds = [first_seed + k for k in range(counts[task.name])]
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
            splits[name] = {"train": load_split(plan.task, "train", data_dir, limit_train)}
            for _, split in plan.task.eval_splits:
                splits[name][split] = load_split(plan.task, split, data_dir, limit_eval)

    rt = runtime or setup_runtime(device)
    try:
        longest = max(plan.hparams.max_length for plan in plans.values())
        model_dir, tok = _prepare_model(model, out, Path(tokenizer) if tokenizer else None, rt, longest)
        if rt.is_main:
            atomic.write_json(out / RUN_FILE, meta)

        results: dict[str, list[dict[str, Any]]] = {}
        for name, plan in plans.items():
            results[name] = _run_task(
                plan,
                plans,
                splits.get(name),
                tok,
                model_dir,
                out,
                rt,
                mnli_start,
                save_every,
                eval_batch_size,
                hooks,
                progress,
            )
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
    from .models import TRAINER_STATE, trainer_checkpoint

    found = trainer_checkpoint(model)
    if found is None:
        return None
    root, tag = found
    if tag is None:
        tag = (root / "latest").read_text().strip()
    state = root / tag / TRAINER_STATE
    try:
        return float(json.loads(state.read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare_model(model: Path, out: Path, tokenizer: Path | None, rt: Runtime, max_length: int) -> tuple[Path, Any]:
    """(transformers folder, tokenizer), vocabulary and max_length checked. A trainer checkpoint is
    exported into `out` first; when that export turns out unusable, a folder this call created is
    removed again."""
    created = not out.exists()
    try:
        if is_trainer_checkpoint(model):
            if rt.is_main:
                resolve_model_dir(model, out, is_main=True)
            rt.barrier()
        model_dir = resolve_model_dir(model, out, is_main=False)
        tok = load_tokenizer(tokenizer or model_dir)
        check_vocab(model_dir, tok)
        check_max_length(model_dir, max_length)
        return model_dir, tok
    except UserError:
        if created and rt.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_task(
    plan: _Plan,
    plans: dict[str, _Plan],
    splits: dict[str, Examples] | None,
    tok: Any,
    model_dir: Path,
    out: Path,
    rt: Runtime,
    mnli_start: bool,
    save_every: int,
    eval_batch_size: int,
    hooks: Hooks | None,
    progress: bool,
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
        disable=not (progress and rt.is_main),
        file=sys.stderr,
    )
    try:
        for k, seed in enumerate(plan.seeds):
            seed_dir = _seed_dir(out, task, seed)
            if seed not in plan.pending:
                continue
            init = _init_dir(plans, task, k, model_dir, out, mnli_start)
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
                save_every=save_every,
                eval_batch_size=eval_batch_size,
                save_model=task.name == "mnli",
                hooks=hooks,
                progress=bar,
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
        atomic.write_json(out / "results.json", summary)
        atomic.write_text(out / "results.md", to_markdown(summary))
    rt.barrier()
    return summary
