"""The warmup floor, the unigram levels in the dataset index, the plateau warning and the
time-to-target fields of `bench convergence` (CPU, no training)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from mosaicbert_ds.data import INDEX_NAME
from mosaicbert_ds.data.unigram import split_counts, unigram_levels, unigram_loss, unigram_stats
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.plateau import METRIC, PlateauWatch
from mosaicbert_ds.train.run_config import load_run_config
from mosaicbert_ds.train.schedule import (
    WarmupLinearDecay,
    fit_schedule_to_budget,
    make_scheduler,
    retarget_schedule,
    warmup_length,
)
from tests.helpers.data import convert_docs, jargon_docs, tokenizer_dir

# ---- the warmup floor ------------------------------------------------------------------------


def test_warmup_is_the_fraction_raised_to_the_floor_which_counts_for_half_the_run_at_most():
    assert warmup_length(70_000, 0.06, 300) == 4200  # the paper's recipe: the fraction wins
    assert warmup_length(2000, 0.06, 300) == 300  # a short run: the floor
    assert warmup_length(400, 0.06, 300) == 200  # shorter than twice the floor: half the run
    assert warmup_length(400, 0.8, 300) == 320  # an explicit fraction above half is kept
    assert warmup_length(1000, 0.06, 0) == 60  # no floor: the fraction alone, as before
    s = WarmupLinearDecay(2000, 0.06, 0.02, min_warmup_steps=300)
    assert s.warmup_steps == 300 and s(0) == pytest.approx(1 / 300) and s(299) == pytest.approx(1.0)
    assert s(1999) == pytest.approx(0.02)


def test_recipes_use_the_floor_and_the_paper_keeps_its_6_percent():
    paper = load_run_config("mosaicbert-base", ["data.path=/d"])
    assert paper.schedule.warmup_fraction == 0.06
    total = paper.duration.samples // paper.batch.global_batch
    assert warmup_length(total, paper.schedule.warmup_fraction, paper.schedule.min_warmup_steps) == 4200
    for recipe in ("mosaicbert-base", "bert-base", "quickstart-cpu", "quickstart-gpu"):
        assert load_run_config(recipe, ["data.path=/d"]).schedule.min_warmup_steps > 0, recipe
    with pytest.raises(UserError, match="schedule.min_warmup_steps must be >= 0"):
        load_run_config("tiny-cpu", ["data.path=/d", "schedule.min_warmup_steps=-1"])


def test_budget_schedule_takes_the_floor_and_a_resume_keeps_the_fitted_schedule():
    """A time budget of about 2,000 steps: 6% would be 120 warmup steps, the floor makes 300.
    The fitted schedule is checkpointed with the LambdaLR and kept on resume."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make_scheduler(100_000, 0.06, 0.02, min_warmup_steps=300)(opt)
    fn = sched.lr_lambdas[0]
    for _ in range(20):
        opt.step()
        sched.step()
    fit_schedule_to_budget(fn, 20, steps_left=1980, max_steps=100_000, warmup_fraction=0.06)
    assert fn.warmup_steps == 300 and fn.total_steps == 2000
    for _ in range(380):
        opt.step()
        sched.step()
    fit_schedule_to_budget(fn, 400, steps_left=1700, max_steps=100_000, warmup_fraction=0.06)
    lrs_before = [fn(t) for t in range(400, 2100)]
    saved = sched.state_dict()

    opt2 = torch.optim.SGD([param], lr=1.0)
    resumed = make_scheduler(100_000, 0.06, 0.02, min_warmup_steps=300)(opt2)
    resumed.load_state_dict(saved)
    assert retarget_schedule(resumed, 100_000, 0.06, 0.02, 300, budget=True) == 100_000  # nothing to report
    assert [resumed.lr_lambdas[0](t) for t in range(400, 2100)] == lrs_before
    # without a budget, a resume recomputes the schedule for the new total, with the floor
    opt3 = torch.optim.SGD([param], lr=1.0)
    steps = make_scheduler(1000, 0.06, 0.02, min_warmup_steps=300)(opt3)
    steps.load_state_dict(saved)
    assert retarget_schedule(steps, 1000, 0.06, 0.02, 300) == 2100 and steps.lr_lambdas[0].warmup_steps == 300


def test_a_checkpointed_schedule_from_before_the_floor_still_loads():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make_scheduler(1000, 0.06, 0.02)(opt)
    state = sched.state_dict()
    del state["lr_lambdas"][0]["min_warmup_steps"]  # an older checkpoint's LambdaLR state
    resumed = make_scheduler(1000, 0.06, 0.02, min_warmup_steps=300)(torch.optim.SGD([param], lr=1.0))
    resumed.load_state_dict(state)
    assert resumed.lr_lambdas[0].warmup_steps == 60  # as it was saved
    retarget_schedule(resumed, 2000, 0.06, 0.02, 300)
    assert resumed.lr_lambdas[0].warmup_steps == 300


# ---- unigram levels in the dataset index ----------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tokenizer_dir(tmp_path_factory)
    return convert_docs(tmp_path_factory.mktemp("uni"), jargon_docs(400), val_docs=40, max_seq_len=64)


def test_convert_stores_the_unigram_levels_counted_from_its_shards(dataset):
    index = json.loads((dataset / INDEX_NAME).read_text())
    train, val = split_counts(dataset, "train"), split_counts(dataset, "val")
    p = train[train > 0] / train.sum()
    assert index["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    smoothed = np.pad(train, (0, 2048 - len(train))) + 1.0
    val = np.pad(val, (0, 2048 - len(val)))
    expected = float(-(val * np.log(smoothed / smoothed.sum())).sum() / val.sum())
    assert index["unigram_val_loss"] == pytest.approx(expected, rel=1e-12)
    assert 4.0 < index["unigram_entropy"] < index["unigram_val_loss"] < math.log(2048)
    assert unigram_loss(dataset) == index["unigram_val_loss"]


def test_an_index_without_the_levels_still_works(dataset, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    index = json.loads((old / INDEX_NAME).read_text())
    stored = {k: index.pop(k) for k in ("unigram_entropy", "unigram_val_loss")}
    (old / INDEX_NAME).write_text(json.dumps(index))
    levels = unigram_levels(old)  # counted from the shards instead
    assert levels == pytest.approx(stored, rel=1e-12)
    cfg = load_run_config("tiny-cpu", [f"data.path={old}"])
    watch = PlateauWatch.for_run(cfg, index, scheduler=None, rank=0)
    metrics = {"loss/eval": 9.0}
    watch.observe(10_000, metrics)
    assert not watch.enabled and metrics == {"loss/eval": 9.0}  # nothing to compare with: silent
    assert unigram_stats(np.array([2, 2]), None, 4) == {
        "unigram_entropy": pytest.approx(math.log(2)),
        "unigram_val_loss": None,
    }


# ---- the plateau warning --------------------------------------------------------------------


def watch(**kw) -> tuple[PlateauWatch, io.StringIO]:
    out = io.StringIO()
    args = dict(level=6.0, margin=0.1, after_steps=100, warmup_steps=lambda: 50, peak_lr=lambda: 3e-3, stream=out)
    return PlateauWatch(**{**args, **kw}), out


def test_plateau_warning_is_one_line_once_after_warmup_and_the_steps():
    w, out = watch()
    assert not w.check(140, 6.02)  # before warmup (50) + 100 steps: not yet
    assert w.check(150, 5.95)  # still within 0.1 nats of the level
    assert not w.check(200, 6.0) and not w.check(300, 6.5)  # at most once
    assert out.getvalue() == (
        "mosaicbert-ds: warning: the held-out loss has not gone below the unigram level after 150 steps "
        "(5.950; token frequencies alone give 6.000): the model ignores its input. Likely causes: too "
        "short a warmup for the peak learning rate, or too high a rate (warmup 50 steps, peak lr 0.003); "
        "raise schedule.min_warmup_steps or lower optimizer.lr (docs/convergence.md).\n"
    )


def test_no_warning_for_a_run_that_left_the_plateau_or_when_off():
    w, out = watch()
    assert not w.check(100, 5.85)  # clearly below once: the run learns
    assert not w.check(1000, 6.0) and out.getvalue() == ""
    for kw in (dict(after_steps=0), dict(level=None), dict(enabled=False)):
        w, out = watch(**kw)
        assert not w.check(10_000, 6.0) and out.getvalue() == "", kw
    w, out = watch()
    assert not w.check(10_000, float("nan")) and out.getvalue() == ""  # divergence is not the plateau
    metrics = {"loss/eval": 5.0}
    w.observe(200, metrics)
    assert metrics == {"loss/eval": 5.0, METRIC: 6.0}  # logged beside the eval loss


# ---- time to targets in `bench convergence` reports -----------------------------------------


def fake_run(out, name: str, data, curve: list[tuple[float, int, float]], seed: int = 17, corpus: str = "jargon"):
    """A finished model run of `bench convergence`: metrics.jsonl (train and eval rows) and its record."""
    run = out / name
    run.mkdir(parents=True)
    rows = []
    for seconds, step, loss in curve:
        rows.append(
            {
                "step": step,
                "loss/train": loss + 0.05,
                "progress/train_seconds": seconds,
                "progress/tokens": step * 1000,
                "throughput/tokens_per_sec": 1000.0,
            }
        )
        rows.append({"step": step, "loss/eval": loss, "accuracy/eval": 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"name": name, "recipe": "r", "overrides": [], "data": str(data), "corpus": corpus, "seed": seed}
    (run / "convergence_run.json").write_text(json.dumps(record))


def test_report_gives_seconds_and_steps_to_each_target_and_says_when_never(dataset, tmp_path):
    from benchmarks.convergence import report

    u = unigram_loss(dataset)
    out = tmp_path / "conv"
    fake_run(out, "mosaicbert", dataset, [(10, 100, u - 0.5), (20, 200, u - 1.5), (30, 300, u - 2.5)])
    fake_run(out, "bert", dataset, [(10, 100, u), (20, 200, u - 0.9), (30, 300, u - 1.2)])
    result = report(out, [], nats=[1.0, 2.0, 3.0])
    assert [t["loss"] for t in result["targets"]] == pytest.approx([u - 1, u - 2, u - 3])
    mosaic, bert = result["models"]["mosaicbert"]["time_to_targets"], result["models"]["bert"]["time_to_targets"]
    assert (mosaic[0]["seconds"], mosaic[0]["step"]) == pytest.approx((15.0, 150.0))  # halfway from -0.5 to -1.5
    assert mosaic[1]["seconds"] == pytest.approx(25.0) and mosaic[1]["tokens"] == pytest.approx(250_000)
    assert not mosaic[2]["reached"] and mosaic[2]["seconds"] is None
    assert bert[0]["seconds"] == pytest.approx(20 + 10 * 0.1 / 0.3) and not bert[1]["reached"]
    assert result["models"]["bert"]["best_loss"] == pytest.approx(u - 1.2)
    text = (out / "convergence.md").read_text()
    assert f"- bert never reached {u - 2:.3f} (unigram - 2) in its 30 s; its best eval loss was {u - 1.2:.3f}." in text
    assert f"- mosaicbert never reached {u - 3:.3f} (unigram - 3)" in text
    assert "| mosaicbert | 15 s (150 steps) | 25 s (250 steps) | never (best" in text
    assert result["corpus"] == "jargon" and result["seed"] == 17


def test_combined_report_gives_mean_and_spread_of_the_time_ratios(dataset, tmp_path, capsys):
    from benchmarks.convergence import main

    u = unigram_loss(dataset)
    dirs = []
    for seed, bert_at in ((17, 40.0), (18, 60.0)):  # bert reaches unigram - 1 at 40 s, then 60 s
        out = tmp_path / f"s{seed}"
        fake_run(out, "mosaicbert", dataset, [(10, 100, u - 0.5), (20, 200, u - 1.0), (30, 300, u - 2.0)], seed)
        fake_run(out, "bert", dataset, [(bert_at, 400, u - 1.0), (bert_at + 10, 500, u - 1.5)], seed)
        assert main(["--out", str(out), "--report"]) == 0
        dirs.append(str(out))
    assert main(["--combine", *dirs, "--out", str(tmp_path / "summary")]) == 0
    summary = json.loads((tmp_path / "summary" / "convergence_summary.json").read_text())
    first = next(r for r in summary["ratios"] if r["below_unigram"] == 1)
    assert first["values"] == pytest.approx([2.0, 3.0]) and first["mean"] == pytest.approx(2.5)
    assert first["sd"] == pytest.approx(math.sqrt(0.5)) and first["n"] == 2
    second = next(r for r in summary["ratios"] if r["below_unigram"] == 2)
    assert second["n"] == 0 and second["only_model_reached"] == ["jargon seed 17", "jargon seed 18"]
    text = (tmp_path / "summary" / "convergence_summary.md").read_text()
    assert "| mosaicbert | unigram - 1 | jargon | 2 | 2.50 | 0.71 | 2.00 | 3.00 | - |" in text
    assert "mosaicbert only: jargon seed 17, jargon seed 18" in text
    assert (tmp_path / "summary" / "convergence_summary.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["--combine", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "convergence.json is missing or unreadable" in capsys.readouterr().err


# ---- the quickstart's held-out predictions --------------------------------------------------


def test_held_out_words_follow_the_rule_and_rank_against_the_unigram(dataset, tmp_path):
    from transformers import AutoTokenizer

    from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
    from mosaicbert_ds.held_out import format_predictions, held_out_predictions, pick_position

    assert pick_position(["[CLS]", *"a b c d e f g".split(), "of", "walk", "##ing", "dog", "x", "[SEP]"]) == 11
    assert pick_position(["[CLS]", "dog", "[SEP]"]) is None
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny", vocab_size=2048)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(dataset / "tokenizer").save_pretrained(model_dir)
    result = held_out_predictions(model_dir, dataset, n=3, samples=16)
    assert result["unigram_top"][0] == "the" and len(result["rows"]) == 3
    for row in result["rows"]:
        assert "[MASK]" in row["context"] and len(row["answer"]) >= 3 and row["answer"].isalpha()
        assert 1 <= row["model_rank"] <= 2048 and 1 <= row["unigram_rank"] <= 2048
    st = result["stats"]
    assert st["words"] == 16 and st["unigram_top1"] <= st["unigram_top5"] <= 16 and st["model_top1"] <= st["model_top5"]
    lines = format_predictions(result)
    assert len(lines) == 2 + 2 * 3 + 1 and "over the first 16 val samples" in lines[-1]
