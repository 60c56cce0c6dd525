"""The trainer end to end on the CPU: real DeepSpeed engine, real MDS data, real TensorBoard files."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import cli, losses, pretrain, pretrain_cmd, side_by_side


def test_smoke_run_logs_checkpoints_and_exports(jargon_data, tmp_path):
    run = tmp_path / "run"
    res = pretrain(
        "tiny-cpu",
        f"data.path={jargon_data}",
        f"output_dir={run}",
        "duration.steps=12",
        "log.interval=2",
        "eval.interval=6",
        "checkpoint.interval=6",
        "optimizer.lr=3e-3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(run)
    assert sorted(curve) == [2, 4, 6, 8, 10, 12]
    assert curve[12] < curve[2] - 0.3, curve  # it learns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "loss/train",
        "accuracy/train",
        "optim/lr",
        "optim/grad_norm",
        "throughput/tokens_per_sec",
        "throughput/samples_per_sec",
        "throughput/tokens_per_sec_per_gpu",
        "throughput/step_time_sec",
        "loss/eval",
        "accuracy/eval",
        "loss_by_position/0-127",  # the evaluation by position bucket (train.position_loss)
        "accuracy_by_position/0-127",
    ):
        assert tag in tags, f"{tag} missing from TensorBoard: {sorted(tags)}"
    assert events.Scalars("throughput/tokens_per_sec")[-1].value > 0

    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000012"
    assert (ckpt / "step_0000006" / "trainer_state.json").is_file()

    out = tmp_path / "hf"
    res = cli("export", ckpt, out)
    assert res.returncode == 0, res.stderr[-2000:]
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import mosaicbert_ds  # noqa: F401  (registers the Auto classes)

    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["the hacker wrote a [MASK] program"], return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    # The export holds the fp32 master weights of the last step, not the initial ones.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, master["bert.embeddings.word_embeddings.weight"]
    )


def test_stopped_and_resumed_run_reproduces_the_uninterrupted_losses(jargon_data, tmp_path):
    common = [
        "tiny-cpu",
        f"data.path={jargon_data}",
        "duration.steps=8",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
    ]
    full, first = side_by_side(  # the uninterrupted run and the first part of the split one
        pretrain_cmd(*common, f"output_dir={tmp_path / 'full'}"),
        pretrain_cmd(*common, f"output_dir={tmp_path / 'split'}", "--stop-after", "3"),
    )
    assert full.returncode == 0, full.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    second = pretrain(*common, f"output_dir={tmp_path / 'split'}")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):  # dropout is on: the RNG state is restored as well as data and weights
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), (step, a, b)


BAD_INPUTS = [
    (["tiny-cpu", "data.path={data}", "optimizer.lrr=1"], "unknown key(s) optimizer.lrr"),
    (["tiny-cpu", "data.path={data}", "duration.steps=ten"], "duration.steps must be an integer"),
    (["tiny-cpu", "data.path={data}", "batch.global_batch=30"], "not a multiple of batch.micro_batch"),
    (["tiny-cpu", "data.path={tmp}/nothing"], "is not a folder"),
    (["no-such-recipe"], "not found"),
    (["tiny-cpu", "data.path={data}", "data.eval_split=heldout"], "data.eval_split: "),  # preflight.check_run
    (["tiny-cpu", "data.path={data}", "model.overrides.num_attention_heads=3"], "must divide hidden_size"),
    (["tiny-cpu", "data.path={data}", "deepspeed_config={tmp}/bad.json"], "train_batch_size"),
]


@pytest.fixture(scope="module")
def refusals(jargon_data, tmp_path_factory) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Each of BAD_INPUTS as a `pretrain --dry-run` in its own folder, two at a time (each is a
    process start and a refusal): [(folder, result)] in BAD_INPUTS' order."""
    folders, commands = [], []
    for args, _ in BAD_INPUTS:
        tmp = tmp_path_factory.mktemp("bad")
        (tmp / "bad.json").write_text(
            json.dumps({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1})
        )
        args = [a.format(data=jargon_data, tmp=tmp) for a in args]
        folders.append(tmp)
        commands.append(pretrain_cmd(*args, f"output_dir={tmp / 'run'}", "--dry-run"))
    return list(zip(folders, side_by_side(*commands, at_once=2)))


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[message for _, message in BAD_INPUTS])
def test_bad_input_fails_with_one_clear_line(refusals, case):
    tmp, res = refusals[case]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    last = res.stderr.strip().splitlines()[-1]
    assert BAD_INPUTS[case][1] in last and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp / "run" / "checkpoints").exists()


def test_resume_refuses_a_checkpoint_of_another_model_shape(jargon_data, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    from mosaicbert_ds import MosaicBertConfig

    MosaicBertConfig.from_name("tiny", vocab_size=8192, hidden_size=128).to_json_file(ckpt / "model_config.json")
    (ckpt / "latest").write_text("step_0000004")
    (ckpt / "step_0000004").mkdir()
    (ckpt / "step_0000004" / "trainer_state.json").write_text("{}")
    res = pretrain("tiny-cpu", f"data.path={jargon_data}", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert "another model shape" in res.stderr and "hidden_size" in res.stderr


def test_bf16_checkpoint_exports_its_fp32_master_weights(jargon_data, tmp_path):
    """bf16 runs save through BF16_Optimizer, whose files DeepSpeed's zero_to_fp32 cannot read:
    export takes the fp32 masters, which round to exactly the bf16 weights the engine trained."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    res = pretrain(
        "tiny-cpu",
        f"data.path={jargon_data}",
        f"output_dir={run}",
        "duration.steps=2",
        "eval.interval=0",
        "precision=bf16",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tag = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert list(tag.glob("bf16_zero_pp_rank_0_*optim_states.pt")), "expected a BF16_Optimizer checkpoint"
    out = tmp_path / "hf"
    proc = cli("export", run, out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(out / "model.safetensors")
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert set(module) <= set(exported)
    for name, bf16 in module.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name].to(torch.bfloat16), bf16), name
