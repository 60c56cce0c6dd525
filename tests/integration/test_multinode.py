"""A two-node job simulated on one CPU machine with the real launchers and gloo.

Two "nodes" of two ranks are started through DeepSpeed's launcher with --no_ssh and node ranks
0 and 1 (launch/deepspeed_no_ssh.sh, as on Kubernetes). They must train exactly like one rank with
4x gradient accumulation on the same data; their checkpoint must resume on two ranks (through
DeepSpeed's universal checkpoint); and mpirun with two ranks (mpi4py discovery) must train too.
Dropout is off so that every layout computes the same function.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT, cpu_allreduce_buffers, deepspeed_launch, free_port, losses, pretrain

pytestmark = pytest.mark.slow

STEPS = 6


def env(**extra: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        **extra,
    }


def overrides(data: Path, out: Path) -> list[str]:
    return [
        "tiny-cpu",
        f"data.path={data}",
        f"output_dir={out}",
        "batch.global_batch=32",
        "batch.micro_batch=8",
        f"duration.steps={STEPS}",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        "model.overrides.hidden_dropout_prob=0.0",
        "data.num_canonical_nodes=2",
    ]


def check(proc: subprocess.CompletedProcess | subprocess.Popen, what: str, output: str = "") -> None:
    assert proc.returncode == 0, f"{what} failed:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def runs(jargon_data, tmp_path_factory) -> dict[str, Path]:
    """The reference (1 rank, accumulation 4) and the 2 nodes x 2 ranks run stopped after 4 steps."""
    tmp = tmp_path_factory.mktemp("runs")
    single = pretrain(*overrides(jargon_data, tmp / "single"))
    check(single, "1-rank run", single.stderr)

    port = str(free_port())
    node_env = env(NUM_NODES="2", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    args = ["bash", "launch/deepspeed_no_ssh.sh", *overrides(jargon_data, tmp / "multi"), "--stop-after", "4"]
    # Real nodes do not share /dev/shm (streaming and DeepSpeed's CPU all-reduce keep per-node state
    # there), so "node 1" gets a private one in its own mount namespace.
    private_shm = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec "$@"',
        "sh",
    ]
    logs = [open(tmp / f"node{n}.log", "w+") for n in (0, 1)]
    nodes = [
        subprocess.Popen(
            (private_shm if n else []) + args,
            cwd=ROOT,
            env={**node_env, "NODE_RANK": str(n)},
            stdout=logs[n],
            stderr=subprocess.STDOUT,
        )
        for n in (1, 0)
    ]
    for proc in nodes:
        proc.wait(timeout=1200)
    for n, proc in zip((1, 0), nodes):
        logs[n].seek(0)
        check(proc, f"node {n}", logs[n].read())
    return {"single": tmp / "single", "multi": tmp / "multi"}


def test_two_nodes_of_two_ranks_match_one_rank_with_accumulation(runs):
    one, four = losses(runs["single"]), losses(runs["multi"])
    assert sorted(four) == [1, 2, 3, 4]
    for step in four:
        assert four[step] == pytest.approx(one[step], rel=2e-5), (step, one, four)
    state = json.loads((runs["multi"] / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["samples"] == 4 * 32


def test_four_rank_checkpoint_resumes_on_two_ranks(runs):
    data = json.loads((runs["multi"] / "run_config.json").read_text())["data"]["path"]
    res = deepspeed_launch(2, "pretrain", *overrides(Path(data), runs["multi"]), timeout=1200)
    check(res, "2-rank resume", res.stdout + res.stderr)
    assert not cpu_allreduce_buffers(res)  # DeepSpeed's 69 MB per rank are not left in /dev/shm
    ckpt = runs["multi"] / "checkpoints"
    assert (ckpt / "step_0000004_universal" / "zero").is_dir()  # went through the universal format
    resumed, one = losses(runs["multi"]), losses(runs["single"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Same weights, optimizer moments, schedule and data position: the uninterrupted losses.
    for step in (5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4), (step, one, resumed)
    state = json.loads((ckpt / f"step_{STEPS:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == STEPS * 32


def test_mpirun_with_two_ranks_trains(jargon_data, tmp_path):
    out = tmp_path / "mpi"
    res = subprocess.run(
        ["bash", "launch/mpirun.sh", *overrides(jargon_data, out)[:-1], "duration.steps=2"],
        cwd=ROOT,
        env=env(NP="2"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    check(res, "mpirun -n 2", res.stdout + res.stderr)
    state = json.loads((out / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    assert sorted(losses(out)) == [1, 2]
