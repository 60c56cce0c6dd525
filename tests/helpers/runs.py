"""Running `mosaicbert-ds` commands in subprocesses on the CPU, as a user would, and reading what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from mosaicbert_ds.train.distributed import free_port  # noqa: F401  (the trainer's choice of MASTER_PORT)

ROOT = Path(__file__).resolve().parents[2]


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment without GPUs, one OpenMP thread per process, plus `extra`."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def pretrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mosaicbert_ds.cli", "pretrain", *args]


def cli(*args: object, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`mosaicbert-ds ARGS` in a subprocess from the repository root, on the CPU (`env` adds variables)."""
    return subprocess.run(
        [sys.executable, "-m", "mosaicbert_ds.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cpu_env(**(env or {})),
    )


def pretrain(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`mosaicbert-ds pretrain ARGS` in a subprocess on the CPU."""
    return cli("pretrain", *args, env=env, timeout=timeout)


def side_by_side(
    *commands: list[str],
    env: dict[str, str] | None = None,
    timeout: int = 900,
    at_once: int | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run independent commands (argv lists) at the same time, `at_once` at most (default: all),
    each process on one thread of the CPU (cpu_env), and return their results in order: runs that
    do not depend on each other take about one run's time on a machine with a core for each.
    (Runs that start at the same moment on one host is a case the trainer handles:
    mosaicbert_ds/data/shm_registration.py.)"""
    results: list[subprocess.CompletedProcess | BaseException | None] = [None] * len(commands)
    slots = threading.Semaphore(at_once or len(commands))

    def wait(i: int, proc: subprocess.Popen, argv: list[str]) -> None:
        try:
            out, err = proc.communicate(timeout=timeout)
            results[i] = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        except BaseException as exc:  # re-raised below, in the test's thread
            proc.kill()
            proc.communicate()
            results[i] = exc
        finally:
            slots.release()

    threads = []
    for i, argv in enumerate(commands):
        slots.acquire()
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(**(env or {}))
        )
        threads.append(threading.Thread(target=wait, args=(i, proc, argv)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def deepspeed_cmd(nproc: int, *args: str) -> list[str]:
    """`deepspeed --num_gpus NPROC --module mosaicbert_ds.cli ARGS`: NPROC gloo ranks on the CPU of
    this host, started by DeepSpeed's own launcher."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    return cmd + ["--master_port", str(free_port()), "--no_local_rank", "--module", "mosaicbert_ds.cli", *args]


def cpu_allreduce_buffers(launched: subprocess.CompletedProcess) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers left in /dev/shm by the deepspeed_cmd run `launched`
    (named after its master port; the trainer removes them once every rank has mapped them)."""
    port = launched.args[launched.args.index("--master_port") + 1]
    names = os.listdir("/dev/shm")
    return [name for name in names if name.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in name]


def deepspeed_launch(
    nproc: int, *args: str, env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run deepspeed_cmd(NPROC, ARGS) on the CPU."""
    return subprocess.run(
        deepspeed_cmd(nproc, *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cpu_env(**(env or {})),
    )


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny-cpu recipe on `data`, logging every step to metrics.jsonl only."""
    return [
        "tiny-cpu",
        f"data.path={data}",
        f"output_dir={out}",
        "log.interval=1",
        "eval.interval=0",
        "log.progress_bar=false",
        "log.tensorboard=false",
        *extra,
    ]


def last_line(res: subprocess.CompletedProcess) -> str:
    return res.stderr.strip().splitlines()[-1]


def metrics_rows(run: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, in the order written."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    """The training loss of each logged step; a step logged twice (after a resume) keeps its last value."""
    return {r["step"]: r["loss/train"] for r in metrics_rows(run) if "loss/train" in r}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what 'left intact' is checked against."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
