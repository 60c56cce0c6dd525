"""The training loop's pieces on the CPU: the tiny model in a real fp32 DeepSpeed engine (one gloo
rank, as `pretrain` runs on a CPU). train_step's loss weighting, Intervals.close (the window's
metrics, timed eval and checkpoint points, the training-seconds budget), when Checkpointer and
Evaluator act, and all_reduce_named over two ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import PRETRAIN, make_batch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.batch import PackedBatch
from mosaicbert_ds.train.checkpointer import Checkpointer, TrainerState
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.evaluator import Evaluator
from mosaicbert_ds.train.health import Health
from mosaicbert_ds.train.intervals import Intervals
from mosaicbert_ds.train.metrics import MetricsLogger
from mosaicbert_ds.train.reduce import all_reduce_named
from mosaicbert_ds.train.run_config import RunConfig
from mosaicbert_ds.train.step import Window, train_step
from mosaicbert_ds.train.stops import StopRequests

ROOT = Path(__file__).resolve().parents[2]
CONFIG = MosaicBertConfig.from_name("tiny", vocab_size=512, hidden_dropout_prob=0.0)  # no dropout: same math

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_for(micro_batch: int) -> object:
    """A fresh engine with global batch 4: micro batch 2 accumulates two micro batches, 4 none."""
    from mosaicbert_ds.train.engine import build_engine

    ds = build_ds_config(global_batch=4, micro_batch=micro_batch, world_size=1, lr=1e-2, bf16=False)
    engine, _ = build_engine(CONFIG, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02)
    return engine


def two_micro_batches() -> tuple[PackedBatch, PackedBatch]:
    a, b = (make_batch(PRETRAIN, 2, vocab=512, seed=seed)["packed"] for seed in (0, 1))
    assert a["masked_positions"].numel() != b["masked_positions"].numel()  # so an unweighted mean differs
    return a, b


def joined(a: PackedBatch, b: PackedBatch) -> PackedBatch:
    """One packed batch holding a's sequences, then b's."""
    t = a["input_ids"].numel()
    return {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]]),
        "cu_seqlens": torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + t]),
        "max_seqlen": max(a["max_seqlen"], b["max_seqlen"]),
        "labels": torch.cat([a["labels"], b["labels"]]),
        "masked_positions": torch.cat([a["masked_positions"], b["masked_positions"] + t]),
    }


def test_two_micro_batches_step_like_one_micro_batch_of_both(one_gloo_rank) -> None:
    """The step's gradient is that of the mean over every masked token, however the global batch
    is split into micro batches: each micro batch's loss is weighted by its share of them."""
    a, b = two_micro_batches()
    split, whole = engine_for(micro_batch=2), engine_for(micro_batch=4)
    assert split.gradient_accumulation_steps() == 2 and whole.gradient_accumulation_steps() == 1
    w_split, w_whole = Window(split.device), Window(whole.device)
    loss_split = train_step(split, iter([a, b]), 2, 1, w_split, CONFIG)
    loss_whole = train_step(whole, iter([joined(a, b)]), 1, 1, w_whole, CONFIG)

    assert split.global_steps == whole.global_steps == 1
    torch.testing.assert_close(loss_split, loss_whole)  # this rank's summed masked-token loss
    torch.testing.assert_close(w_split.loss, w_whole.loss)
    torch.testing.assert_close(w_split.correct, w_whole.correct)
    masked = a["masked_positions"].numel() + b["masked_positions"].numel()
    tokens = a["input_ids"].numel() + b["input_ids"].numel()
    assert (w_split.micro, w_whole.micro) == (2, 1)
    assert (w_split.samples, w_split.tokens, w_split.masked) == (w_whole.samples, w_whole.tokens, w_whole.masked)
    assert (w_split.samples, w_split.tokens, w_split.masked) == (4, tokens, masked)
    assert w_split.flops == pytest.approx(w_whole.flops)
    # the same gradient (its norm is taken before clipping), hence the same update
    assert float(split.get_global_grad_norm()) == pytest.approx(float(whole.get_global_grad_norm()), rel=1e-5)
    for p, q in zip(split.module.parameters(), whole.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_interval_close_logs_the_window_and_decides_eval_checkpoint_and_budget(one_gloo_rank, tmp_path: Path) -> None:
    engine = engine_for(micro_batch=2)
    cfg = RunConfig()
    cfg.eval.interval_seconds, cfg.checkpoint.interval_seconds, cfg.duration.train_seconds = 100.0, 1000.0, 250.0
    state = TrainerState()
    stops = StopRequests()  # never installed: the test sets what a signal would
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    n_params = sum(p.numel() for p in engine.module.parameters())
    intervals = Intervals(
        cfg, engine, state, 100, 1, n_params, 1e12, logger, Health(engine.device), stops, None, lambda: "none"
    )
    a, b = two_micro_batches()
    step_loss = train_step(engine, iter([a, b]), 2, 1, intervals.window, CONFIG)
    state.step = 1
    intervals.health.update(1, step_loss, engine.get_global_grad_norm())
    w = intervals.window
    loss, accuracy, tokens, flops = float(w.loss) / w.masked, float(w.correct) / w.masked, w.tokens, w.flops

    # training seconds go from 95 to about 105: past a multiple of the eval interval (100), not of
    # the checkpoint interval (1000), short of the budget (250)
    state.train_seconds = 95.0
    w.start = time.perf_counter() - 10.0
    result = intervals.close()
    m = result.metrics
    seconds = state.train_seconds - 95.0
    assert 10.0 <= seconds < 12.0
    assert m["loss/train"] == pytest.approx(loss) and m["accuracy/train"] == pytest.approx(accuracy)
    assert m["throughput/tokens_per_sec"] == pytest.approx(tokens / seconds)
    assert m["throughput/samples_per_sec"] == pytest.approx(4 / seconds)
    assert m["throughput/step_time_sec"] == pytest.approx(seconds)  # one optimizer step in the window
    assert m["throughput/mfu"] == pytest.approx(6 * n_params * tokens / seconds / 1e12)
    assert m["throughput/mfu_exact"] == pytest.approx(flops / seconds / 1e12)
    assert m["optim/nonfinite_steps"] == 0 and m["optim/lr"] == pytest.approx(engine.get_lr()[0])
    assert (state.samples, state.tokens) == (4, tokens)
    assert m["progress/train_seconds"] == state.train_seconds
    assert result.evaluate and not result.checkpoint and not result.budget_reached and result.stop is None
    # the schedule is re-fitted to end when the budget is used up, at the measured step time
    lr_lambda = engine.lr_scheduler.lr_lambdas[0]
    assert lr_lambda.budget_fitted and lr_lambda.total_steps == 1 + round((250.0 - state.train_seconds) / seconds)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and logged[-1]["loss/train"] == pytest.approx(loss)
    assert w.micro == 0 and w.tokens == 0 and float(w.loss) == 0  # a fresh window

    # about 245 -> 255 seconds: past the budget, and no multiple of 100 or 1000 crossed
    state.train_seconds = 245.0
    w.start = time.perf_counter() - 10.0
    result = intervals.close()
    assert result.budget_reached and not result.evaluate and not result.checkpoint

    # a signal on this rank stops every rank at this step
    stops.signal_name = "SIGTERM"
    assert intervals.close().stop == "SIGTERM"
    logger.close()


def test_checkpoint_and_eval_points() -> None:
    every_3 = Checkpointer(Path("ckpt"), interval=3, interval_seconds=0.0, keep_last=0, rank=0, world=1)
    assert [s for s in range(1, 10) if every_3.save_due(s, False, False, False)] == [3, 6, 9]
    assert every_3.save_due(4, last_step=True, stopping=False, timed=False)
    assert every_3.save_due(4, last_step=False, stopping=True, timed=False)  # a stop saves first
    assert every_3.save_due(4, last_step=False, stopping=False, timed=True)
    at_end = Checkpointer(Path("ckpt"), interval=0, interval_seconds=0.0, keep_last=0, rank=0, world=1)
    assert not any(at_end.save_due(s, False, False, False) for s in range(1, 10))
    assert at_end.save_due(10, last_step=True, stopping=False, timed=False)

    every_2 = Evaluator(loader=[], interval=2, max_batches=0)
    assert [s for s in range(1, 7) if every_2.due(s, False, False)] == [2, 4, 6]
    assert every_2.due(5, last_step=True, timed=False) and every_2.due(5, last_step=False, timed=True)
    assert not Evaluator(loader=[], interval=0, max_batches=0).due(4, False, False)
    off = Evaluator(loader=None, interval=2, max_batches=0)  # eval.interval 0 and no held-out split
    assert not any(off.due(s, last, timed) for s in (2, 3) for last in (False, True) for timed in (False, True))


def test_all_reduce_named_on_one_rank(one_gloo_rank) -> None:
    sums, rows = all_reduce_named({"loss": torch.tensor(2.5), "tokens": 7}, {"health": torch.tensor([1.0, 0.0])})
    assert sums == {"loss": 2.5, "tokens": 7.0} and rows == {"health": [[1.0, 0.0]]}


RANK_SCRIPT = """
import json
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
from mosaicbert_ds.train.reduce import all_reduce_named

r = dist.get_rank()
sums, rows = all_reduce_named(
    {"device": torch.tensor(r + 1.0), "host": 10 * (r + 1), "count": 3},
    {"row": torch.tensor([float(r), r + 0.5, -1.0]), "one": torch.tensor([5.0 * r])},
)
print(json.dumps({"sums": sums, "rows": rows}))
"""


@pytest.mark.slow
def test_all_reduce_named_sums_scalars_and_gathers_rows_over_two_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            cwd=ROOT,
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    for out, _ in outputs:  # every rank gets the sums and every rank's rows, each under its name
        got = json.loads(out.strip().splitlines()[-1])
        assert got["sums"] == {"device": 3.0, "host": 30.0, "count": 6.0}
        assert got["rows"] == {"row": [[0.0, 0.5, -1.0], [1.0, 1.5, -1.0]], "one": [[0.0], [5.0]]}
