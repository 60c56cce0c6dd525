"""The learning-rate schedule: warmup then linear decay to the floor, and its fit to a time budget."""

import pytest

from mosaicbert_ds.train.schedule import WarmupLinearDecay, fit_schedule_to_budget


def test_schedule_warms_up_then_decays_to_the_floor():
    s = WarmupLinearDecay(total_steps=1000, warmup_fraction=0.06, final_ratio=0.02)
    assert s(0) == pytest.approx(1 / 60) and s(59) == pytest.approx(1.0)
    assert s(60) == pytest.approx(1.0) and s(999) == pytest.approx(0.02)
    values = [s(t) for t in range(60, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert s(529) == pytest.approx(1 - 0.98 * 469 / 939)


def test_budget_fit_warms_up_monotonically_and_decays_to_the_floor_at_the_estimate():
    """A time budget: the run starts with the step cap's schedule, then follows estimates of the
    steps left. The rate must only rise in warmup and reach the floor at the estimated end."""
    s = WarmupLinearDecay(total_steps=100_000, warmup_fraction=0.06, final_ratio=0.02)
    lrs = [s(t) for t in range(20)]
    fit_schedule_to_budget(s, 20, steps_left=4980, max_steps=100_000, warmup_fraction=0.06)
    assert s.warmup_steps == 300 and s.total_steps == 5000
    lrs += [s(t) for t in range(20, 200)]
    fit_schedule_to_budget(s, 200, steps_left=5800, max_steps=100_000, warmup_fraction=0.06)  # faster steps
    assert s.warmup_steps == 300 and s.total_steps == 6000  # warmup kept, the decay's end moves
    lrs += [s(t) for t in range(200, 6000)]
    assert all(a <= b for a, b in zip(lrs[:300], lrs[1:300]))
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(lrs[300:], lrs[301:]))
    fit_schedule_to_budget(s, 6000, steps_left=1e9, max_steps=7000, warmup_fraction=0.06)
    assert s.total_steps == 7000 and s(6999) == pytest.approx(0.02)  # the step cap holds


def test_budget_refit_during_decay_stays_continuous_and_never_rises():
    s = WarmupLinearDecay(total_steps=1000, warmup_fraction=0.1, final_ratio=0.02)
    s.budget_fitted = True
    before = s(500)
    fit_schedule_to_budget(s, 500, steps_left=1500, max_steps=10_000, warmup_fraction=0.1)  # slower estimate: later end
    assert s(500) == pytest.approx(before)  # no jump up
    lrs = [s(t) for t in range(500, 2000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.02)
    fit_schedule_to_budget(s, 800, steps_left=100, max_steps=10_000, warmup_fraction=0.1)  # faster: earlier end
    assert s(800) == pytest.approx(lrs[300]) and s(899) == pytest.approx(0.02) and s(850) < s(800)
