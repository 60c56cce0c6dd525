"""Long inputs end to end on the CPU: token-budget batches on one and two ranks, a second phase at
2048 tokens on packed rows, the position-bucket evaluation in the trainer and on an export.

Dropout is off where runs are compared, so every layout computes the same function.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train import token_batches
from tests.helpers.data import convert_docs, long_docs
from tests.helpers.runs import cli, deepspeed_cmd, losses, metrics_rows, pretrain, pretrain_cmd, side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def common(data: Path, out: Path) -> list[str]:
    return [
        "tiny-cpu",
        f"data.path={data}",
        f"output_dir={out}",
        f"duration.steps={STEPS}",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        "log.progress_bar=false",
        "model.overrides.hidden_dropout_prob=0.0",
        "data.num_canonical_nodes=2",
    ]


@pytest.fixture(scope="module")
def long2048(jargon_data, tmp_path_factory) -> Path:
    """Documents of ~1800 tokens, cut at 2048 and packed, with the 128-token dataset's tokenizer."""
    return convert_docs(
        tmp_path_factory.mktemp("long"),
        long_docs(60),
        name="long2048",
        tokenizer=jargon_data / "tokenizer",
        max_seq_len=2048,
        split_long=True,
        pack=True,
        val_docs=4,
    )


@pytest.fixture(scope="module")
def runs(jargon_data, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One rank with micro batches of 16 samples (4 accumulation steps), and two ranks with micro
    batches of at most 300 tokens and the global batch from batch.global_tokens: both 64 samples
    per step."""
    tmp = tmp_path_factory.mktemp("runs")
    fixed, two = side_by_side(  # independent runs, at the same time
        pretrain_cmd(*common(jargon_data, tmp / "fixed"), "batch.global_batch=64", "batch.micro_batch=16"),
        deepspeed_cmd(
            2, "pretrain", *common(jargon_data, tmp / "two"), "batch.global_tokens=4000", "batch.micro_tokens=300"
        ),
    )
    assert fixed.returncode == 0, fixed.stderr[-4000:]
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return {"fixed": (tmp / "fixed", fixed), "two": (tmp / "two", two)}


@pytest.mark.slow
def test_token_budgets_on_one_and_two_ranks_train_like_fixed_micro_batches(runs):
    """The loss of a step is the mean over the global batch's masked tokens whatever the split:
    one rank with micro batches of 16 samples and two ranks with micro batches of at most 300
    tokens, whose counts differ per rank and step (each rank marks its own accumulation boundary;
    tests/integration/test_data_loader.py shows the counts), give the same losses on the same
    samples. The one-rank token-budget path runs in the second-phase test below."""
    reference, got = losses(runs["fixed"][0]), losses(runs["two"][0])
    assert sorted(reference) == sorted(got) == list(range(1, STEPS + 1))
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=2e-5), (step, reference, got)
    last = [r for r in metrics_rows(runs["two"][0]) if "progress/samples" in r][-1]
    assert last["progress/samples"] == STEPS * 64
    run_dir, res = runs["two"]
    assert (
        "mosaicbert-ds: batches: global batch 64 samples, ~3,997 tokens (batch.global_tokens 4000 at 62.5 "
        "tokens per sample); micro batches of at most 300 tokens (batch.micro_tokens) of each rank's 32 "
        "samples; 2 rank(s)" in res.stderr
    )
    batch = json.loads((run_dir / "run_config.json").read_text())["batch"]
    assert batch == {"global_batch": 64, "micro_batch": 32, "micro_tokens": 300, "global_tokens": 4000}
    assert "global batch 64 samples, ~3,997 tokens (batch.global_batch); micro batches of 16 samples " in (
        runs["fixed"][1].stderr
    )


@pytest.fixture(scope="module")
def phase2(runs, long2048, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The 128-token run continued in place at 2048 tokens on packed rows: a new dataset
    (data.new_dataset), a new global batch, token budgets; weights, optimizer and schedule go on."""
    out = tmp_path_factory.mktemp("phase2") / "run"
    shutil.copytree(runs["fixed"][0], out)
    res = pretrain(
        *common(long2048, out),
        "data.new_dataset=true",
        "duration.steps=6",
        "batch.global_batch=4",
        "batch.micro_tokens=4096",
        "eval.interval=6",
        "eval.batches=3",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res


@pytest.mark.slow
def test_second_phase_at_2048_continues_the_128_token_run(phase2, long2048):
    out, res = phase2
    assert f"data.new_dataset: {long2048} replaces the checkpoint's dataset" in res.stderr
    assert "the global batch changes from 64 to 4 sequences on resume" in res.stderr
    assert "the duration changes from 4 to 6 steps" in res.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]  # phase 1's four steps, then two at 2048
    state = json.loads((out / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    from mosaicbert_ds.data import read_dataset_info

    assert state["dataset"] == read_dataset_info(str(long2048))["identity"] and state["samples"] == 4 * 64 + 2 * 4
    evaluation = [r for r in metrics_rows(out) if "loss/eval" in r][-1]
    for bucket in ("0-127", "128-511", "512-1023", "1024-2047"):
        assert 0 < evaluation[f"loss_by_position/{bucket}"] < 20, bucket
        assert 0 <= evaluation[f"accuracy_by_position/{bucket}"] <= 1
    assert "loss_by_position/2048-4095" not in evaluation


@pytest.fixture(scope="module")
def exported(phase2, tmp_path_factory) -> Path:
    hf = tmp_path_factory.mktemp("export") / "hf"
    res = cli("export", phase2[0] / "checkpoints", hf)
    assert res.returncode == 0, res.stderr[-2000:]
    return hf


@pytest.mark.slow
def test_export_at_2048_loads_and_eval_mlm_matches_the_trainer(phase2, exported, long2048, tmp_path):
    out, hf = phase2[0], exported
    result_file = tmp_path / "eval.json"
    res = cli("eval-mlm", hf, "--data", long2048, "--micro-tokens", "4096", "--max-batches", "3", "--out", result_file)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MLM loss by position" in res.stdout and "1024-2047" in res.stdout
    result = json.loads(result_file.read_text())
    trainer = [r for r in metrics_rows(out) if "loss/eval" in r][-1]  # the same weights, batches and masks
    assert result["loss"] == pytest.approx(trainer["loss/eval"], rel=1e-5)
    for bucket, row in result["by_position"].items():
        assert row["loss"] == pytest.approx(trainer[f"loss_by_position/{bucket}"], rel=1e-5), bucket

    # the export runs at 2048 with plain transformers: padded and packed forms agree
    from transformers import AutoModelForMaskedLM

    import mosaicbert_ds  # noqa: F401  (registers the Auto classes)

    model = AutoModelForMaskedLM.from_pretrained(hf).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [2048, 700]
    ids = [torch.randint(5, model.config.vocab_size - 64, (n,), generator=g) for n in lengths]
    padded = torch.zeros(2, 2048, dtype=torch.long)
    mask = torch.zeros(2, 2048, dtype=torch.long)
    for row, x in enumerate(ids):
        padded[row, : len(x)], mask[row, : len(x)] = x, 1
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits[mask.bool()]
        cu = torch.tensor([0, 2048, 2748], dtype=torch.int32)
        b = model(torch.cat(ids), cu_seqlens=cu, max_seqlen=2048).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    code = cli("eval-mlm", hf, "--data", long2048, "--out", hf)
    assert code.returncode == 2 and code.stderr.strip().splitlines()[-1] == (
        f"mosaicbert-ds eval-mlm: error: --out {hf} is a folder; name a JSON file"
    )


@pytest.mark.slow
def test_phase_two_recipe_starts_from_an_export(exported, long2048, tmp_path):
    """The bundled second-phase recipe, as documented: model.init_from an export, the 2048-token
    data, batches in tokens (checked up to the engine: --dry-run)."""
    res = pretrain(
        "mosaicbert-base-phase2-1024",
        f"model.init_from={exported}",
        "model.preset=",  # the export is a tiny model here, not Base
        f"data.path={long2048}",
        f"output_dir={tmp_path / 'p2'}",
        "batch.global_tokens=null",  # the recipe's would be more samples than this small dataset has
        "batch.global_batch=16",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "run file OK: 1 rank(s), 7000 steps"


@pytest.mark.parametrize(
    "args, message",
    [
        (["batch.micro_tokens=0"], "batch.micro_tokens must be positive, got 0"),
        (
            ["batch.micro_tokens=512", "batch.micro_batch=8"],
            "batch.micro_tokens and batch.micro_batch both set the same size: set one of them",
        ),
        (
            ["batch.global_tokens=4096", "batch.global_batch=64"],
            "batch.global_tokens and batch.global_batch both set the same size: set one of them",
        ),
        (
            ["model.overrides={position_embedding_type: learned, max_position_embeddings: 64}"],
            "data.path {data} holds sequences of up to 128 tokens, but the model's learned position embeddings "
            "stop at max_position_embeddings=64; convert with --max-seq-len 64 (or, for a new model, set "
            "model.overrides.max_position_embeddings=128)",
        ),
    ],
)
def test_bad_token_settings_are_one_line(jargon_data, tmp_path, args, message):
    from mosaicbert_ds.config import MosaicBertConfig
    from mosaicbert_ds.data import read_dataset_info
    from mosaicbert_ds.train.preflight import check_run
    from mosaicbert_ds.train.run_config import load_run_config

    with pytest.raises(UserError) as err:
        cfg = load_run_config("tiny-cpu", [f"data.path={jargon_data}", f"output_dir={tmp_path / 'run'}", *args])
        info = read_dataset_info(str(jargon_data))
        model = MosaicBertConfig.from_name("tiny", **{"vocab_size": info["vocab_size"], **cfg.model.overrides})
        check_run(cfg, model, {"train_batch_size": 32}, info)
    assert str(err.value) == message.format(data=jargon_data)
    assert not (tmp_path / "run").exists()


def test_micro_tokens_below_the_longest_sample_stop_before_the_engine(jargon_data, tmp_path):
    out = tmp_path / "run"
    res = pretrain(
        "tiny-cpu",
        f"data.path={jargon_data}",
        f"output_dir={out}",
        "batch.micro_tokens=100",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and not out.exists()
    assert res.stderr.strip().splitlines()[-1] == (
        f"mosaicbert-ds pretrain: error: batch.micro_tokens=100 is below the longest sample of {jargon_data} "
        "(128 tokens): a micro batch must hold at least one whole sample"
    )


def test_token_micro_batches_set_deepspeed_and_refuse_what_cannot_run():
    ds = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}
    token_batches.token_micro_batches(ds, 2, zero_stage=1)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 1)
    with pytest.raises(UserError, match="ZeRO stage 2 reduces gradients at every micro batch"):
        token_batches.token_micro_batches(dict(ds), 2, zero_stage=2)
    token_batches.token_micro_batches(dict(ds), 1, zero_stage=2)  # one rank: nothing to line up
    with pytest.raises(UserError, match="64 samples is not divisible by 3 ranks"):
        token_batches.token_micro_batches(dict(ds), 3, zero_stage=1)
    assert token_batches.global_batch_for_tokens(524288, 128.0) == 4096
    assert token_batches.global_batch_for_tokens(524288, 1000.0) == 512  # 524.3 -> the nearest multiple of 64
    assert token_batches.global_batch_for_tokens(1000, 1000.0) == 64  # at least 64
    assert token_batches.graph_token_step(None) == 256 and token_batches.graph_token_step(32768) == 4096
