"""init_distributed: what each launcher's variables turn into, and a real 2-process mpirun."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.distributed import DistInfo, _expand_slurm_counts, discover
from tests.integration.test_launch import LAUNCH, assert_every_rank_ok, checks, launch_env


def test_deepspeed_launcher_variables():
    # what deepspeed.launcher.launch gives rank 5 of 2 nodes x 4
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert discover(env) == DistInfo(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1)
    assert env["LOCAL_WORLD_SIZE"] == "4" and env["NODE_RANK"] == "1"  # exported for mosaicml-streaming
    assert env["MASTER_ADDR"] == "10.0.0.1"


def test_torchrun_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
    }
    assert discover(env) == DistInfo(3, 4, 1, 2, 1)


def test_srun_variables():
    env = {
        "SLURM_PROCID": "6",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NUM_NODES": "2",
        "MASTER_ADDR": "gpu-001",
        "MASTER_PORT": "23456",
    }
    assert discover(env) == DistInfo(6, 8, 2, 4, 1)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("6", "8", "2")


def test_srun_on_several_nodes_needs_master_addr():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "SLURM_STEP_NUM_NODES": "2",
    }
    with pytest.raises(UserError, match="set MASTER_ADDR"):
        discover(env)


def test_sbatch_script_itself_is_one_process():
    # The batch step has SLURM_PROCID/SLURM_NTASKS but is one process: not an srun step.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}
    assert discover(env) == DistInfo(0, 1, 0, 1, 0)


def test_plain_process():
    env: dict[str, str] = {}
    assert discover(env) == DistInfo(0, 1, 0, 1, 0)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    # below the ephemeral range: no process's outgoing connection takes it before it is listened on
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert int(env["MASTER_PORT"]) < low


PLAIN_PROCESS_GROUP = """
import torch.distributed as dist
from mosaicbert_ds.train.distributed import init_distributed
info = init_distributed(use_cuda=False)
dist.barrier()
print("world", info.world_size, dist.get_world_size())
"""


def test_a_plain_process_starts_its_group_without_listening_on_a_port():
    """A plain process's MASTER_PORT was found free at start; another process can hold it by the
    time a TCP store would listen there (EADDRINUSE). One process uses an in-process store."""
    from tests.helpers.runs import ROOT, cpu_env

    env = {k: v for k, v in cpu_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["MASTER_PORT"] = str(taken.getsockname()[1])
        proc = subprocess.run(
            [sys.executable, "-c", PLAIN_PROCESS_GROUP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 1 1" in proc.stdout.splitlines()  # (DeepSpeed logs to stdout too)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "inconsistent launcher variables"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
    ],
)
def test_bad_variables(env, message):
    with pytest.raises(UserError, match=message):
        discover(env)


def test_expand_slurm_counts():
    assert _expand_slurm_counts("4(x2),2") == [4, 4, 2]
    assert _expand_slurm_counts("8") == [8]


@pytest.mark.slow
def test_mpirun_two_processes(tmp_path):
    """A real `mpirun -n 2` (MPICH from the venv) through launch/mpirun.sh: ranks, local ranks and
    the master address come from mpi4py, then a gloo all-reduce."""
    proc = subprocess.run(
        [str(LAUNCH / "mpirun.sh"), "run.yaml", "k=v"],
        env=launch_env(tmp_path, NP="2", MBDS_DISABLE_NVLS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = checks(proc.stdout)
    assert_every_rank_ok(records, 2, ["pretrain", "run.yaml", "k=v"], per_node=2)
    assert {r["env"]["MASTER_ADDR"] for r in records} == {socket.gethostname()}  # broadcast from rank 0
    assert len({r["env"]["MASTER_PORT"] for r in records}) == 1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "-1"}, "node rank -1"),
        (
            {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2(xa)"},
            "SLURM_STEP_TASKS_PER_NODE='2(xa)' is not of the form",
        ),
    ],
)
def test_more_bad_variables(env, message):
    import re

    with pytest.raises(UserError, match=re.escape(message)):
        discover(env)


def test_node_ranks_sharing_a_host_count_as_one_streaming_node():
    from mosaicbert_ds.train.distributed import ranks_per_host

    assert ranks_per_host(["a", "a", "b", "b"], [0, 0, 1, 1]) is None  # one node rank per host
    assert ranks_per_host(["a"] * 4, [0, 0, 1, 1]) == 4  # two launchers on one host
    assert ranks_per_host(["a", "a", "a", "a", "b", "b", "b", "b"], [0, 0, 1, 1, 2, 2, 3, 3]) == 4
    with pytest.raises(UserError, match=r"node ranks \[0, 2\] share host 'a', but not as equal, contiguous"):
        ranks_per_host(["a", "b", "a", "b"], [0, 1, 2, 3])
    with pytest.raises(UserError, match="not as equal, contiguous blocks"):
        ranks_per_host(["a", "a", "a", "b"], [0, 1, 2, 3])


def test_local_rank_argument_is_taken_and_exported(monkeypatch):
    from mosaicbert_ds.train.distributed import take_local_rank_arg

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert take_local_rank_arg(["--local_rank=3", "pretrain", "run", "a=1"]) == ["pretrain", "run", "a=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "1")  # the launcher's variable wins
    assert take_local_rank_arg(["pretrain", "--local-rank", "5", "run"]) == ["pretrain", "run"]
    assert os.environ["LOCAL_RANK"] == "1"
    with pytest.raises(UserError, match="--local_rank must be a non-negative integer, got 'x'"):
        take_local_rank_arg(["--local_rank=x", "pretrain"])


def test_cli_accepts_the_local_rank_argument(capsys):
    from tests.helpers.data import run_cli

    code, _, err = run_cli(["--local_rank=0", "pretrain", "tiny-cpu", "data.path=/d", "model.preset=huge"], capsys)
    assert code == 2 and err.strip().splitlines() == [  # reached pretrain's own checks
        "mosaicbert-ds pretrain: error: model.preset: unknown model preset 'huge'; choose one of "
        "['base', 'bert-base', 'bert-large', 'large', 'tiny']"
    ]
    code, _, err = run_cli(["--local_rank=x", "pretrain"], capsys)
    assert code == 2 and err.strip() == "mosaicbert-ds: error: --local_rank must be a non-negative integer, got 'x'"
