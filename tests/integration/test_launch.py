"""Hostfiles and the launch scripts, run for real on this CPU machine.

The multi-node tests put two "nodes" on localhost (1 slot each, gloo) and run the launch check
(`MBDS_MODULE=mosaicbert_ds.train.distributed`) instead of training: every rank starts the process
group, all-reduces, and reports its place and the environment it was handed. The caller's
environment is stripped of the NCCL/timeout variables first, so the values the ranks report can
only have come through launch/env.sh and the launcher's own way of passing them on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.hostfile import check_master, parse_hostfile
from mosaicbert_ds.train.hostfile import main as hostfile_main
from tests.helpers.runs import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["deepspeed_hostfile.sh", "deepspeed_no_ssh.sh", "mpirun.sh", "slurm.sbatch", "env.sh"]
H200_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""What MBDS_DISABLE_NVLS=1 sets (the tests opt in, as the project's H200 machine needs)."""


# ---------------------------------------------------------------------------------------------
# Hostfiles


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_parse_hostfile(tmp_path):
    text = "# two nodes\n\nworker-1 slots=8\n  worker-0   slots=4   # trailing comment\n"
    path = _hostfile(tmp_path, text)
    hosts = parse_hostfile(path)
    assert list(hosts.items()) == [("worker-1", 8), ("worker-0", 4)]  # file order: the first is rank 0's
    from deepspeed.launcher.runner import _parse_hostfile  # DeepSpeed reads the same file the same way

    assert dict(_parse_hostfile(text.splitlines())) == hosts
    assert parse_hostfile(LAUNCH / "hostfile.example") == {"worker-0": 8, "worker-1": 8}


@pytest.mark.parametrize(
    "text, message",
    [
        ("a slots=2\nb\n", r":2: expected 'HOST slots=N', got 'b'"),
        ("a slots=2\nb slots=0\n", r":2: slots must be a positive integer, got '0' for host 'b'"),
        ("a slots=two\n", r":1: slots must be a positive integer, got 'two'"),
        ("a slots=-1\n", r":1: slots must be a positive integer, got '-1'"),
        ("a slots=2\n\nb slots=2\na slots=4\n", r":4: duplicate host 'a' \(first on line 1\)"),
        ("a slots=2 max_slots=4\n", r":1: expected 'HOST slots=N'"),
        ("slots=8\n", r":1: line starts with slots= but names no host"),
        ("# nothing here\n\n", r"hostfile lists no hosts"),
        ("", r"hostfile lists no hosts"),
    ],
)
def test_bad_hostfile(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        parse_hostfile(_hostfile(tmp_path, text))


def test_hostfile_cli(tmp_path, capsys):
    good = _hostfile(tmp_path, "n0 slots=2\nn1 slots=3\n")
    assert hostfile_main(["--check", str(good), "--print", "vars"]) == 0
    assert capsys.readouterr().out.strip() == "HOSTFILE_NODES=2 HOSTFILE_SLOTS=5 HOSTFILE_FIRST_HOST=n0"
    assert hostfile_main(["--check", str(good), "--print", "mpich"]) == 0
    assert capsys.readouterr().out.split() == ["n0:2", "n1:3"]
    assert hostfile_main(["--check", str(tmp_path / "nope")]) == 2
    assert "cannot read hostfile" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without anything the launch is supposed to provide itself."""
    drop = ("NCCL_", "TORCH_NCCL_", "NVSHMEM_", "TORCH_SYMM_MEM_", "OMPI_", "PMI", "SLURM_")
    dropped = {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "DEEPSPEED_TIMEOUT",
        "DS_ENV_FILE",
        "HOSTFILE",
        "NUM_NODES",
        "GPUS_PER_NODE",
        "NP",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in dropped}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MBDS_MODULE"] = "mosaicbert_ds.train.distributed"  # the launch check instead of training
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def checks(output: str) -> list[dict]:
    """The launch check's lines, sorted by rank."""
    records = [
        json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("mbds-launch-check ")
    ]
    return sorted(records, key=lambda r: r["rank"])


def assert_every_rank_ok(records: list[dict], world: int, argv: list[str], *, per_node: int) -> None:
    assert [r["rank"] for r in records] == list(range(world)), records
    for r in records:
        assert r["ok"] and r["sum"] == world * (world + 1) / 2 and r["world_size"] == world, r
        assert r["local_world_size"] == per_node and r["local_rank"] == r["rank"] % per_node, r
        assert r["node_rank"] == r["rank"] // per_node, r
        assert r["argv"] == argv, r
        env = r["env"]
        assert {k: env[k] for k in H200_ENV} == H200_ENV, env  # the opt-in reaches every rank in every mode
        assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker0" and env["DEEPSPEED_TIMEOUT"] == "30", env
        # every "node" of these tests is on this one host: streaming sees the host's ranks as one node
        assert env["LOCAL_WORLD_SIZE"] == str(world) and env["NODE_RANK"] == str(r["node_rank"]), env


def test_bad_hostfile_stops_the_launch_before_deepspeed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "deepspeed-was-called"
    (bin_dir / "deepspeed").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    bad = _hostfile(tmp_path, "node0 slots=1\nnode1 slots=\n")
    env = launch_env(tmp_path, HOSTFILE=str(bad), NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    for script in ("deepspeed_hostfile.sh", "deepspeed_no_ssh.sh"):
        proc = subprocess.run([str(LAUNCH / script), "run.yaml"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"{bad}:2: slots must be a positive integer" in proc.stderr
    assert not marker.exists()


def test_script_without_run_file_prints_usage(tmp_path):
    proc = subprocess.run(
        [str(LAUNCH / "deepspeed_no_ssh.sh")], env=launch_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "NODE_RANK=0 MASTER_ADDR=node0" in proc.stderr


def test_env_file_lines(tmp_path):
    """What deepspeed_hostfile.sh writes for DeepSpeed's env file: KEY=VALUE lines only."""
    env = launch_env(
        tmp_path, NCCL_IB_HCA="mlx5_0,mlx5_1", MBDS_EXTRA_ENV="MY_SETTING", MY_SETTING="x y", MBDS_DISABLE_NVLS="1"
    )
    out = subprocess.run(
        ["bash", "-c", f"source {LAUNCH / 'env.sh'} && mbds_env_lines"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = dict(line.split("=", 1) for line in out.splitlines())  # DeepSpeed's reader does exactly this
    assert {k: pairs[k] for k in H200_ENV} == H200_ENV
    assert pairs["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and pairs["MY_SETTING"] == "x y"
    assert pairs["NCCL_DEBUG"] == "WARN" and pairs["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert all(line and not line.startswith("#") for line in out.splitlines())


@pytest.mark.slow
def test_deepspeed_no_ssh_two_nodes(tmp_path):
    """The real deepspeed launcher, --no_ssh, one invocation per "node" (2 x 1 rank on localhost)."""
    env = launch_env(
        tmp_path,
        NUM_NODES="2",
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        MBDS_DISABLE_NVLS="1",
    )
    procs = [
        subprocess.Popen(
            [str(LAUNCH / "deepspeed_no_ssh.sh"), "run.yaml", "a=1", "b=two words"],
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (1, 0)
    ]
    outputs = [p.communicate(timeout=540)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    records = checks("\n".join(outputs))
    assert_every_rank_ok(records, 2, ["pretrain", "run.yaml", "a=1", "b=two words"], per_node=1)
    assert all(r["env"]["MASTER_ADDR"] == "127.0.0.1" for r in records)


FAKE_PDSH = """#!/usr/bin/env bash
# pdsh stand-in: run the command once per -w host, each in a clean login-like environment
# (only PATH and HOME), with %n replaced by the host's index, as pdsh does.
while [ $# -gt 0 ]; do
  case "$1" in -S) shift;; -f) shift 2;; -w) hosts="$2"; shift 2;; *) break;; esac
done
cmd="$*"; i=0; pids=()
for host in ${hosts//,/ }; do
  env -i PATH=/usr/bin:/bin HOME="$HOME" bash -c "${cmd//%n/$i}" &
  pids+=($!); i=$((i + 1))
done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc
"""
FAKE_SSH = """#!/usr/bin/env bash
# ssh stand-in for DeepSpeed's reachability check: drop the options and the host, run the rest.
while [ "${1:-}" = "-o" ] || [ "${1:-}" = "-p" ]; do shift 2; done
shift; exec "$@"
"""


@pytest.mark.slow
def test_deepspeed_hostfile_pdsh_mode(tmp_path):
    """The real deepspeed runner in pdsh mode; pdsh and ssh are local stand-ins that start each
    "node" in an empty environment, so the variables must travel through DeepSpeed's env file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("pdsh", FAKE_PDSH), ("ssh", FAKE_SSH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    hostfile = _hostfile(tmp_path, "localhost slots=1\nlocalnode1 slots=1\n")
    env = launch_env(
        tmp_path,
        HOSTFILE=str(hostfile),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        NCCL_IB_HCA="mlx5_test",
        MBDS_DISABLE_NVLS="1",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)  # DeepSpeed forwards PYTHON* itself
    proc = subprocess.run(
        [str(LAUNCH / "deepspeed_hostfile.sh"), "run.yaml", "x=1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = checks(proc.stdout)
    assert_every_rank_ok(records, 2, ["pretrain", "run.yaml", "x=1"], per_node=1)
    assert all(r["env"]["NCCL_IB_HCA"] == "mlx5_test" for r in records)  # optional NCCL settings too
    assert not list(tmp_path.glob("mbds-deepspeed-env.*"))  # the env file is removed afterwards


def test_nvlink_sharp_is_left_on_unless_opted_out(tmp_path):
    """By default env.sh sets none of the NVLS switches; MBDS_DISABLE_NVLS=1 sets all three."""
    script = f"source {LAUNCH / 'env.sh'} && mbds_env_lines"
    default = subprocess.run(
        ["bash", "-c", script], env=launch_env(tmp_path), capture_output=True, text=True, check=True
    ).stdout
    assert not set(H200_ENV) & {line.split("=", 1)[0] for line in default.splitlines()}, default
    off = subprocess.run(
        ["bash", "-c", script],
        env=launch_env(tmp_path, MBDS_DISABLE_NVLS="1"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert H200_ENV.items() <= dict(line.split("=", 1) for line in off.splitlines()).items()
    bad = subprocess.run(
        ["bash", "-c", script], env=launch_env(tmp_path, MBDS_DISABLE_NVLS="yes"), capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "bash: error: MBDS_DISABLE_NVLS='yes' must be 0 (default: NVLink SHARP as NCCL chooses) or 1 (off)"
    ]


NO_SSH = dict(NODE_RANK="0", MASTER_ADDR="127.0.0.1", NUM_NODES="2", GPUS_PER_NODE="1")


@pytest.mark.parametrize(
    "script, variables, message",
    [
        ("deepspeed_no_ssh.sh", dict(NO_SSH, NUM_NODES="two"), "NUM_NODES='two' is not a non-negative integer"),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, NUM_NODES="0"), "NUM_NODES=0 is out of range: it must be 1 or more"),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, NODE_RANK="x"), "NODE_RANK='x' is not a non-negative integer"),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, NODE_RANK="-1"), "NODE_RANK='-1' is not a non-negative integer"),
        (
            "deepspeed_no_ssh.sh",
            dict(NO_SSH, NODE_RANK="2"),
            "NODE_RANK=2 is out of range: it must be between 0 and 1 (2 nodes: 0 is the master)",
        ),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, NODE_RANK=""), "set NODE_RANK (0 on the master node)"),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, GPUS_PER_NODE="1.5"), "GPUS_PER_NODE='1.5' is not a non-negative integer"),
        (
            "deepspeed_no_ssh.sh",
            dict(NO_SSH, GPUS_PER_NODE="0"),
            "GPUS_PER_NODE=0 is out of range: it must be 1 or more",
        ),
        (
            "deepspeed_no_ssh.sh",
            {k: v for k, v in NO_SSH.items() if k != "GPUS_PER_NODE"},
            "set GPUS_PER_NODE (GPUs, or CPU ranks, per node)",
        ),
        (
            "deepspeed_no_ssh.sh",
            dict(NO_SSH, MASTER_PORT="70000"),
            "MASTER_PORT=70000 is out of range: it must be between 1 and 65535",
        ),
        (
            "deepspeed_hostfile.sh",
            dict(HOSTFILE=str(LAUNCH / "hostfile.example"), NUM_NODES="3", MASTER_ADDR="127.0.0.1"),
            "NUM_NODES=3 is out of range: it must be between 1 and 2 (the hostfile lists 2 hosts)",
        ),
        (
            "deepspeed_hostfile.sh",
            dict(HOSTFILE=str(LAUNCH / "hostfile.example"), GPUS_PER_NODE="all"),
            "GPUS_PER_NODE='all' is not a non-negative integer",
        ),
        ("deepspeed_hostfile.sh", {}, "set HOSTFILE (a DeepSpeed hostfile, see launch/hostfile.example)"),
        ("mpirun.sh", dict(NP="0"), "NP=0 is out of range: it must be 1 or more"),
        ("mpirun.sh", dict(NP="eight"), "NP='eight' is not a non-negative integer"),
        ("deepspeed_no_ssh.sh", dict(NO_SSH, DEEPSPEED_TIMEOUT="30m"), "DEEPSPEED_TIMEOUT='30m' is not a non-negative"),
    ],
)
def test_bad_launch_variables_are_one_line_before_any_launcher(tmp_path, script, variables, message):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "launcher-was-called"
    for name in ("deepspeed", "mpirun"):
        (bin_dir / name).write_text(f"#!/bin/sh\ntouch {marker}\n")
        (bin_dir / name).chmod(0o755)
    env = launch_env(tmp_path, **variables)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(LAUNCH / script), "run.yaml"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"{script}: error: {message}"] or (
        proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    ), proc.stderr
    assert not marker.exists() and not list(tmp_path.glob("mbds-*"))  # no launcher, no temporary files left


def test_check_master_resolves_the_address_the_ranks_meet_at(tmp_path):
    hosts = parse_hostfile(_hostfile(tmp_path, "localhost slots=1\nno-such-node.invalid slots=1\n"))
    check_master(hosts, "hf", "")  # the first host, localhost
    check_master(hosts, "hf", "127.0.0.1")
    check_master(hosts, "hf", "::1")
    with pytest.raises(UserError, match="MASTER_ADDR 'no-such-node.invalid' does not resolve: "):
        check_master(hosts, "hf", "no-such-node.invalid")
    with pytest.raises(UserError, match="MASTER_ADDR '127.0.0.1:29500' includes a port: give the host alone"):
        check_master(hosts, "hf", "127.0.0.1:29500")
    with pytest.raises(UserError, match=r"'no-such-node.invalid' does not resolve: .* \(tried for 2 s\)"):
        check_master({"no-such-node.invalid": 1}, "hf", "", wait=2)


def test_a_master_address_that_does_not_resolve_stops_the_launch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "deepspeed-was-called"
    (bin_dir / "deepspeed").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    hostfile = _hostfile(tmp_path, "no-such-node.invalid slots=1\nlocalhost slots=1\n")
    for script, variables, message in (
        (
            "deepspeed_hostfile.sh",
            dict(HOSTFILE=str(hostfile)),
            f"{hostfile}: the first host (the master address unless MASTER_ADDR is set) 'no-such-node.invalid' "
            "does not resolve: ",
        ),
        (
            "deepspeed_no_ssh.sh",
            dict(NO_SSH, MASTER_ADDR="no-such-node.invalid"),
            "MASTER_ADDR 'no-such-node.invalid' does not resolve: ",
        ),
    ):
        env = launch_env(tmp_path, **variables)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        proc = subprocess.run([str(LAUNCH / script), "run.yaml"], env=env, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"hostfile: error: {message}"), lines
    assert not marker.exists() and not list(tmp_path.glob("mbds-*"))


@pytest.mark.slow
def test_two_nodes_on_one_host_train_as_documented(jargon_data, tmp_path):
    """launch/README.md's two-"nodes"-on-one-host example for real: both node launchers share this
    host's /dev/shm (no private mount), node 1 through deepspeed_no_ssh.sh, node 0 through the plain
    deepspeed command without --no_local_rank. Streaming must not collide (FileExistsError) and
    `pretrain` must accept --local_rank=N."""
    run = [
        "tiny-cpu",
        f"data.path={jargon_data}",
        f"output_dir={tmp_path / 'run'}",
        "duration.steps=2",
        "log.interval=1",
        "eval.interval=2",
        "eval.batches=1",
        "checkpoint.interval=0",
    ]
    port = str(free_port())
    env = launch_env(
        tmp_path,
        NUM_NODES="2",
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        MBDS_MODULE="mosaicbert_ds.cli",
        CUDA_VISIBLE_DEVICES="",
    )
    hostfile = _hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    plain = [
        "deepspeed",
        "--no_ssh",
        "--node_rank",
        "0",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        "--module",
        "mosaicbert_ds.cli",
        "pretrain",
        *run,
    ]
    logs = [open(tmp_path / f"node{n}.log", "w+") for n in (0, 1)]
    procs = [
        subprocess.Popen(
            [str(LAUNCH / "deepspeed_no_ssh.sh"), *run],
            env={**env, "NODE_RANK": "1"},
            cwd=ROOT,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(plain, env=env, cwd=ROOT, stdout=logs[0], stderr=subprocess.STDOUT),
    ]
    for proc in procs:
        proc.wait(timeout=900)
    text = ""
    for log in logs:
        log.seek(0)
        text += log.read()
    assert all(p.returncode == 0 for p in procs), text[-4000:]
    assert "FileExistsError" not in text and "--local_rank=0" in text  # DeepSpeed did pass it
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/train" in r] == [1, 2] and any("loss/eval" in r for r in rows)
