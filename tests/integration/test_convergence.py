"""`bench convergence` end to end on the CPU: two tiny models through the real pretrain command.

Both models (a tiny MosaicBERT at 30% masking on the packed stream, a tiny BERT-architecture
model at 15% on padded batches) train for the same 500 steps on the bundled Jargon File; their
held-out MLM loss must end well below the unigram baseline computed from the same data, i.e. they
learned more than token frequencies. The report must be complete (table, JSON, plot).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.data import convert_docs, jargon_docs, tokenizer_dir
from tests.helpers.runs import side_by_side

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY_BERT = (
    "bert=bert-base,model.preset=tiny,model.overrides.position_embedding_type=learned,"
    "model.overrides.mlp_type=gelu,model.overrides.unpad=false,"
    "model.overrides.attention_probs_dropout_prob=0.1"
)
TINY_MOSAIC = "mosaicbert=mosaicbert-base,model.preset=tiny"
# The step cap ends each run (about 90 s on an idle 2-core machine; the budget is far above it,
# so that a busy machine still reaches the cap); 500 steps is where the tiny models are clearly
# past the unigram plateau (about 0.25 nats below it).
CPU_ARGS = [
    "--seconds",
    "1200",
    "--max-steps",
    "500",
    "--eval-every",
    "15",
    "--checkpoint-every",
    "30",
    "--global-batch",
    "32",
    "--micro-batch",
    "32",
    "--lr",
    "3e-3",
    "--min-warmup-steps",
    "100",
    "--num-workers",
    "0",
    "--log-interval",
    "5",
    "--eval-batches",
    "4",
    "--precision",
    "fp32",
]


def bench(*args: object) -> list[str]:
    """The command `python -m benchmarks.convergence ARGS`."""
    return [sys.executable, "-m", "benchmarks.convergence", *map(str, args)]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(bench(*args), cwd=REPO, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tokenizer_dir(tmp_path_factory)
    return convert_docs(tmp_path_factory.mktemp("conv"), jargon_docs(4000), val_docs=200)


def test_both_models_learn_beyond_unigram(dataset: Path, tmp_path: Path) -> None:
    from benchmarks.convergence import unigram_loss

    out = tmp_path / "conv"
    models = ["--model", TINY_MOSAIC, "--model", TINY_BERT]
    # one model per call, as on the GPU; the two calls at the same time, one CPU thread each
    trained = side_by_side(
        *(
            bench("--data", dataset, "--out", out, *models, "--only", name, *CPU_ARGS)
            for name in ("mosaicbert", "bert")
        ),
        timeout=1500,
    )
    for done in trained:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = run(["--out", str(out), "--report"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "convergence.json").read_text())
    assert (out / "convergence.png").stat().st_size > 1000 and "| mosaicbert |" in (out / "convergence.md").read_text()
    unigram = unigram_loss(dataset)
    assert result["unigram_loss"] == pytest.approx(unigram)
    for name, m in result["models"].items():
        assert m["steps"] == 500, (name, m["steps"], m["train_seconds"])
        seconds = [p["seconds"] for p in m["points"]]
        assert len(seconds) >= 3 and seconds == sorted(seconds)
        assert m["final_loss"] < unigram - 0.15, (name, m["final_loss"], unigram, m["points"])
        assert set(m["time_to_final_of"]) == {"mosaicbert", "bert"} - {name}
        assert [t["below_unigram"] for t in m["time_to_targets"]] == [1.0, 2.0, 3.0]
        # the budget's schedule: the rate only rises in warmup, then only falls, to the floor at the end
        logged = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        lrs = [r["optim/lr"] for r in logged if "optim/lr" in r]
        peak = lrs.index(max(lrs))
        assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True), lrs
        assert max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] == pytest.approx(0.02 * 3e-3, rel=0.05)
    # checkpoints at the timed points and at the end, listed for `mosaicbert-ds pareto`
    done = run(["--out", str(out), "--pareto-listing"])
    assert done.returncode == 0, done.stderr
    listing = json.loads((out / "pareto_listing.json").read_text())
    for name in ("mosaicbert", "bert"):
        hours = [e["hours"] for e in listing if e["run"] == name]
        assert (
            len(hours) >= 2
            and hours == sorted(hours)
            and hours[-1] * 3600 == pytest.approx(result["models"][name]["train_seconds"])
        )


def test_refuses_a_used_folder_and_bad_model_spec(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "mosaicbert").mkdir()
    (tmp_path / "mosaicbert" / "keep.txt").write_text("not ours")
    used, bad_spec, empty = side_by_side(  # independent refusals, at the same time
        bench("--data", dataset, "--out", tmp_path, "--only", "mosaicbert"),
        bench("--data", dataset, "--out", tmp_path / "x", "--model", "bad name=bert-base"),
        bench("--out", tmp_path / "empty", "--report"),
    )
    assert used.returncode == 2 and "not empty" in used.stderr
    assert (tmp_path / "mosaicbert" / "keep.txt").read_text() == "not ours"
    assert bad_spec.returncode == 2 and "NAME=RECIPE" in bad_spec.stderr
    assert empty.returncode == 2 and "no finished model runs" in empty.stderr
