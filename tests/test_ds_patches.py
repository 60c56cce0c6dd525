"""The batched BF16_Optimizer gradient accumulation (mosaicbert_ds.train.ds_patches) against
DeepSpeed's own loop: a real engine (bf16, ZeRO-1, fp32 accumulation) on the CPU, in a fresh
process per run, two micro batches per step; the fp32 master weights must match bitwise."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.train.distributed import init_distributed
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.pretrain import build_engine
from benchmarks.synthetic import PRETRAIN, make_batch

batched = sys.argv[1] == "1"
init_distributed()
ds = build_ds_config(global_batch=8, micro_batch=4, world_size=1, lr=1e-3)
ds["bf16"] = {"enabled": True}
cfg = MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0)
engine, _ = build_engine(cfg, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02,
                         batched_grad_accumulation=batched)
opt = engine.optimizer
losses = []
for step in range(3):
    for j in range(2):
        out = engine(**make_batch(PRETRAIN, 4, vocab=cfg.vocab_size, seed=2 * step + j)["packed"])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
master = torch.cat([p.detach().flatten() for g in opt.fp32_groups_flat_partition for p in [g]])
print(json.dumps({"optimizer": type(opt).__name__, "patched": opt.update_hp_grads.__func__.__module__,
                  "losses": losses, "master": master.view(torch.int32).tolist()[:4096],
                  "master_sum": float(master.double().sum())}))
"""


def run(batched: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "1" if batched else "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batched_accumulation_matches_deepspeed_bitwise():
    ours, theirs = run(batched=True), run(batched=False)
    assert ours["optimizer"] == theirs["optimizer"] == "BF16_Optimizer"
    assert ours["patched"] == "mosaicbert_ds.train.ds_patches"
    assert theirs["patched"].startswith("deepspeed.")
    assert ours["losses"] == theirs["losses"]
    assert ours["master"] == theirs["master"] and ours["master_sum"] == theirs["master_sum"]
    assert len(set(ours["losses"])) > 1  # the weights moved between micro batches
