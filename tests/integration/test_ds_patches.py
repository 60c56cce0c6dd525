"""The batched BF16_Optimizer loops (mosaicbert_ds.train.deepspeed_internals: gradient accumulation,
gradient norm, clipping) against DeepSpeed's own: a real engine (bf16, ZeRO-1, fp32 accumulation)
on the CPU, in a fresh process per run, two micro batches per step, with clipping that always
and that never applies; gradient norms and fp32 master weights must match bitwise, with torch's AdamW
and its fused kernel
(with which a non-finite norm is skipped on the device, without a host sync)."""

import pytest

from tests.helpers.ranks import run_script

SCRIPT = r"""
import json, sys, torch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.train.distributed import init_distributed
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.engine import build_engine
from benchmarks.synthetic import PRETRAIN, make_batch

batched, clip, fused, poison = sys.argv[1] == "1", float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
init_distributed()
ds = build_ds_config(global_batch=8, micro_batch=4, world_size=1, lr=1e-3, gradient_clipping=clip, fused=fused)
ds["bf16"] = {"enabled": True}
cfg = MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0)
engine, _ = build_engine(cfg, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02,
                         batched_optimizer=batched)
opt = engine.optimizer


def master():
    return torch.cat([g.detach().flatten() for g in opt.fp32_groups_flat_partition])


losses, norms, unchanged = [], [], []
for step in range(3):
    before = master().clone()
    for j in range(2):
        out = engine(**make_batch(PRETRAIN, 4, vocab=cfg.vocab_size, seed=2 * step + j)["packed"])
        engine.backward(out.loss)
        if step == poison and j == 1:  # a non-finite gradient at this step's boundary
            opt.fp32_groups_gradients_flat[0].view(-1)[0] = float("inf")
        engine.step()
        losses.append(out.loss.item())
    norms.append(float(opt._global_grad_norm))
    unchanged.append(bool(torch.equal(before, master())))
steps = [float(st["step"]) for st in opt.optimizer.state.values() if "step" in st]
m = master()
print(json.dumps({"optimizer": type(opt).__name__, "allreduce": engine.enable_backward_allreduce,
                  "fused": bool(opt.optimizer.defaults.get("fused")),
                  "patched": opt.update_hp_grads.__func__.__module__,
                  "patched_step": opt.step.__func__.__module__, "norms": norms, "losses": losses,
                  "unchanged": unchanged, "adam_steps": steps, "master": m.view(torch.int32).tolist()[:4096],
                  "master_sum": float(m.double().sum())}))
"""


def run(batched: bool, clip: float, fused: bool = False, poison: int = -1) -> dict:
    return run_script(SCRIPT, "1" if batched else "0", str(clip), "1" if fused else "0", str(poison))


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
@pytest.mark.parametrize("clip", [1e-4, 1e4], ids=["always-clipped", "never-clipped"])
def test_batched_optimizer_matches_deepspeed_bitwise(clip, fused):
    ours, theirs = run(batched=True, clip=clip, fused=fused), run(batched=False, clip=clip, fused=fused)
    assert ours["optimizer"] == theirs["optimizer"] == "BF16_Optimizer"
    assert ours["fused"] is theirs["fused"] is fused
    assert ours["allreduce"] is theirs["allreduce"] is False  # one rank: nothing to reduce
    assert ours["patched"] == ours["patched_step"] == "mosaicbert_ds.train.deepspeed_internals"
    assert theirs["patched"].startswith("deepspeed.") and theirs["patched_step"].startswith("deepspeed.")
    assert ours["norms"] == theirs["norms"]
    assert (min(ours["norms"]) > clip) if clip < 1 else (max(ours["norms"]) < clip)  # the branch under test
    assert ours["losses"] == theirs["losses"]
    assert ours["master"] == theirs["master"] and ours["master_sum"] == theirs["master_sum"]
    assert len(set(ours["losses"])) > 1  # the weights moved between micro batches


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "device-skip"])
def test_a_non_finite_gradient_norm_skips_the_step(fused):
    """DeepSpeed skips a step whose gradient norm is not finite after a host sync; with fused AdamW
    the batched step skips it on the device. Either way the master weights and Adam's step count
    stay, and the next step trains on."""
    for batched in (True, False):
        out = run(batched=batched, clip=1.0, fused=fused, poison=1)
        assert out["unchanged"] == [False, True, False], (batched, out["unchanged"])
        assert out["norms"][1] == float("inf") and all(n < float("inf") for n in (out["norms"][0], out["norms"][2]))
        assert out["adam_steps"] and set(out["adam_steps"]) == {2.0}, out["adam_steps"]  # steps 1 and 3 only
        assert all(x == x for x in out["losses"])  # no NaN after the skipped step
