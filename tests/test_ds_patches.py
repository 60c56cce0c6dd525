"""The batched BF16_Optimizer loops (mosaicbert_ds.train.ds_patches: gradient accumulation,
gradient norm, clipping) against DeepSpeed's own: a real engine (bf16, ZeRO-1, fp32 accumulation)
on the CPU, in a fresh process per run, two micro batches per step, with clipping that always
and that never applies; gradient norms and fp32 master weights must match bitwise."""

import pytest
from single_rank import run_script

SCRIPT = r"""
import json, sys, torch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.train.distributed import init_distributed
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.pretrain import build_engine
from benchmarks.synthetic import PRETRAIN, make_batch

batched = sys.argv[1] == "1"
init_distributed()
ds = build_ds_config(global_batch=8, micro_batch=4, world_size=1, lr=1e-3, gradient_clipping=float(sys.argv[2]))
ds["bf16"] = {"enabled": True}
cfg = MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0)
engine, _ = build_engine(cfg, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02,
                         batched_optimizer=batched)
opt = engine.optimizer
losses, norms = [], []
for step in range(3):
    for j in range(2):
        out = engine(**make_batch(PRETRAIN, 4, vocab=cfg.vocab_size, seed=2 * step + j)["packed"])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    norms.append(float(opt._global_grad_norm))
master = torch.cat([p.detach().flatten() for g in opt.fp32_groups_flat_partition for p in [g]])
print(json.dumps({"optimizer": type(opt).__name__, "allreduce": engine.enable_backward_allreduce, "patched": opt.update_hp_grads.__func__.__module__,
                  "patched_step": opt.step.__func__.__module__, "norms": norms, "losses": losses, "master": master.view(torch.int32).tolist()[:4096],
                  "master_sum": float(master.double().sum())}))
"""


def run(batched: bool, clip: float) -> dict:
    return run_script(SCRIPT, "1" if batched else "0", str(clip))


@pytest.mark.parametrize("clip", [1e-4, 1e4], ids=["always-clipped", "never-clipped"])
def test_batched_optimizer_matches_deepspeed_bitwise(clip):
    ours, theirs = run(batched=True, clip=clip), run(batched=False, clip=clip)
    assert ours["optimizer"] == theirs["optimizer"] == "BF16_Optimizer"
    assert ours["allreduce"] is theirs["allreduce"] is False  # one rank: nothing to reduce
    assert ours["patched"] == ours["patched_step"] == "mosaicbert_ds.train.ds_patches"
    assert theirs["patched"].startswith("deepspeed.") and theirs["patched_step"].startswith("deepspeed.")
    assert ours["norms"] == theirs["norms"]
    assert (min(ours["norms"]) > clip) if clip < 1 else (max(ours["norms"]) < clip)  # the branch under test
    assert ours["losses"] == theirs["losses"]
    assert ours["master"] == theirs["master"] and ours["master_sum"] == theirs["master_sum"]
    assert len(set(ours["losses"])) > 1  # the weights moved between micro batches
