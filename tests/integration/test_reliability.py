"""Failures a run must survive or report, each on the CPU with the tiny model and the real engine:
divergence, signals and time limits, damaged checkpoints, a second run on the same folder, a full
disk during a save. Every case checks the exit code, the one-line message and what was there before."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosaicbert_ds.train import checkpoint as ckpt
from mosaicbert_ds.train.schedule import WarmupLinearDecay
from tests.helpers.runs import (
    ROOT,
    cpu_env,
    last_line,
    losses,
    metrics_rows,
    pretrain,
    pretrain_cmd,
    snapshot,
    tiny_run,
)

pytestmark = pytest.mark.slow


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = run / "metrics.jsonl"
        if path.is_file() and any(json.loads(r)["step"] >= step for r in path.read_text().splitlines() if r):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_divergence_is_logged_and_stops_the_run_with_the_last_good_checkpoint(jargon_data, tmp_path):
    run = tmp_path / "run"
    # lr 1e30: step 1 blows the weights up, every later loss is NaN and the optimizer skips the step
    res = pretrain(
        *tiny_run(
            jargon_data,
            run,
            "duration.steps=20",
            "checkpoint.interval=1",
            "optimizer.lr=1e30",
            "schedule.warmup_fraction=0",
            "divergence.max_nonfinite_steps=3",
        )
    )
    assert res.returncode == 3, res.stderr[-3000:]
    line = last_line(res)
    assert line.startswith("mosaicbert-ds pretrain: diverged at step 4: 3 consecutive non-finite steps from step 2"), (
        line
    )
    # steps 2 and 3 were non-finite: their save points are skipped, so the last good one is step 1's
    assert "rank(s) 0" in line and f"last good checkpoint: {run / 'checkpoints' / 'step_0000001'}" in line, line
    assert "Traceback" not in res.stderr
    for step in (2, 3):
        assert f"no checkpoint at step {step}: 1 non-finite step(s) since the previous save point" in res.stderr
    log = {r["step"]: r for r in metrics_rows(run)}
    assert log[1]["loss/train"] is not None and "nonfinite" not in log[1]
    assert log[2]["loss/train"] is None and "loss/train" in log[2]["nonfinite"]  # logged as what it is
    assert [log[s]["optim/nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    root = run / "checkpoints"
    assert ckpt.step_tags(root) == ["step_0000001"]  # nothing saved after the first non-finite step


def test_second_run_on_the_folder_refuses_and_sigterm_saves_and_exits_4(jargon_data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        pretrain_cmd(*tiny_run(jargon_data, run, "duration.steps=200", "checkpoint.interval=0")),
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_step(run, 1, first)
        second = pretrain(*tiny_run(jargon_data, run, "duration.steps=200"))
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another run (pid" in last_line(second), last_line(second)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 4, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("mosaicbert-ds pretrain: stopped at step ") and "(SIGTERM)" in line, line
    assert "Traceback" not in err
    step = int(line.split("stopped at step ")[1].split()[0])
    assert ckpt.complete_tags(run / "checkpoints") == [f"step_{step:07d}"]
    assert max(r["step"] for r in metrics_rows(run)) == step


def test_wall_time_stops_like_a_signal(jargon_data, tmp_path):
    run = tmp_path / "run"
    res = pretrain(*tiny_run(jargon_data, run, "duration.steps=200", "duration.wall_time=1s"))
    assert res.returncode == 4, res.stderr[-3000:]
    assert "stopped at step 1 (duration.wall_time 1s reached)" in last_line(res), last_line(res)
    assert ckpt.complete_tags(run / "checkpoints") == ["step_0000001"]


@pytest.fixture(scope="module")
def three_tags(jargon_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tags") / "run"
    res = pretrain(*tiny_run(jargon_data, run, "duration.steps=3", "checkpoint.interval=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".run.lock").unlink(missing_ok=True)
    return dst


def test_every_save_is_complete_and_latest_is_only_a_hint(three_tags, tmp_path, capsys):
    root = copy_run(three_tags, tmp_path / "run") / "checkpoints"
    assert ckpt.complete_tags(root) == ["step_0000001", "step_0000002", "step_0000003"]
    assert (root / "latest").read_text() == "step_0000003"
    for text in ("", "step_00000", "\x00\x00garbage"):  # empty or corrupt latest: the folders decide
        (root / "latest").write_text(text)
        assert ckpt.resolve_tag(root) == "step_0000003"
    (root / "latest").unlink()
    assert ckpt.resolve_resume("auto", root) == (root, "step_0000003")
    assert "using the newest complete checkpoint step_0000003" in capsys.readouterr().err


def test_damaged_newest_falls_back_and_explicit_tags_must_be_complete(three_tags, tmp_path, capsys):
    from mosaicbert_ds.errors import UserError

    root = copy_run(three_tags, tmp_path / "run") / "checkpoints"
    shard = next((root / "step_0000003").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (root / "step_0000002" / "rng_rank0.pt").unlink()  # a missing per-rank file
    assert ckpt.resolve_tag(root) == "step_0000001"
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "truncated" in err and "rng_rank0.pt is missing" in err
    with pytest.raises(UserError, match="step_0000003 is not complete: .*truncated"):
        ckpt.resolve_resume(str(root / "step_0000003"), root)
    with pytest.raises(UserError, match="rng_rank0.pt is missing"):
        ckpt.resolve_tag(root, "step_0000002")
    for tag in ("step_0000001", "step_0000002", "step_0000003"):
        (root / tag / ckpt.COMPLETE).unlink()
    with pytest.raises(UserError, match="none is complete"):  # never a silent restart from step 0
        ckpt.resolve_resume("auto", root)


def test_resume_skips_a_damaged_tag_and_recomputes_the_schedule_for_a_longer_run(three_tags, tmp_path):
    run = copy_run(three_tags, tmp_path / "run")
    root = run / "checkpoints"
    next(iter((root / "step_0000003").glob("*optim_states.pt"))).unlink()  # a missing shard
    before = (root / "step_0000002" / ckpt.COMPLETE).read_text()
    res = pretrain(
        *tiny_run(
            Path(json.loads((run / "run_config.json").read_text())["data"]["path"]),
            run,
            "duration.steps=6",
            "checkpoint.interval=0",
        )
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping damaged checkpoint" in res.stderr and "optim_states.pt is missing" in res.stderr
    assert "the duration changes from 3 to 6 steps" in res.stderr
    assert (root / "step_0000002" / ckpt.COMPLETE).read_text() == before  # the resumed tag is untouched
    lr = json.loads((run / "run_config.json").read_text())["optimizer"]["lr"]
    resumed = [r for r in metrics_rows(run) if r["step"] == 3][-1]  # the re-run step 3, after the fallback to 2
    schedule = WarmupLinearDecay(6, 0.06, 0.02)
    assert resumed["optim/lr"] == pytest.approx(lr * schedule(3), rel=1e-6)  # lr after the step-3 update
    assert ckpt.complete_tags(root)[-1] == "step_0000006"


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(jargon_data, tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to mount a small tmpfs")
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    run = mnt / "run"
    # one checkpoint of the tiny model is about 10 MB: the first fits, the second does not
    script = 'mount -t tmpfs -o size=16m tmpfs "$1" && shift && "$@"; rc=$?; cp -a "$MNT/run" "$KEPT"; exit $rc'
    res = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(mnt),
            *pretrain_cmd(*tiny_run(jargon_data, run, "duration.steps=4", "checkpoint.interval=1")),
        ],
        cwd=ROOT,
        env={**cpu_env(), "MNT": str(mnt), "KEPT": str(kept)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 5, res.stderr[-3000:]
    line = last_line(res)
    assert "could not save checkpoint step_0000002 at step 2: no space left on device" in line, line
    assert f"{run / 'checkpoints' / 'step_0000001'} is intact" in line, line
    root = kept / "checkpoints"
    assert ckpt.complete_tags(root) == ["step_0000001"] and not (root / "step_0000002").exists()
    assert ckpt.resolve_tag(root) == "step_0000001"


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def worker_env(pid: int, name: str) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    return next((e[len(prefix) :].decode() for e in environ if e.startswith(prefix)), None)


def kill_rank_1(proc: subprocess.Popen, attempt: str) -> None:
    """SIGKILL rank 1 of torchrun's restart attempt `attempt` (TORCHELASTIC_RESTART_COUNT)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for pid in children(proc.pid):
            if worker_env(pid, "RANK") == "1" and worker_env(pid, "TORCHELASTIC_RESTART_COUNT") == attempt:
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.2)
    raise AssertionError(f"no rank 1 of attempt {attempt}")


def test_a_killed_rank_is_restarted_in_place_then_by_a_rerun_and_reproduces_the_losses(jargon_data, tmp_path):
    """2 CPU ranks under `torchrun --max-restarts 1` (gloo): rank 1 is killed (SIGKILL) after step 2
    and torchrun restarts both ranks in place; rank 1 of that attempt is killed after step 4, with
    no restart left, so the job ends; the same command is run again (what a job script, Slurm's
    requeue or a DeepSpeed launcher re-run does). Each start resumes from the newest complete
    checkpoint, and every logged loss equals the uninterrupted run's."""

    def torchrun(out: Path, restarts: int = 0) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            str(restarts),
            "-m",
            "mosaicbert_ds.cli",
            "pretrain",
            *tiny_run(
                jargon_data,
                out,
                "duration.steps=6",
                "checkpoint.interval=1",
                "batch.global_batch=32",
                "batch.micro_batch=8",
            ),
        ]

    full = subprocess.run(
        torchrun(tmp_path / "full"), cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=900
    )
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun(run, restarts=1), cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_step(run, 2, proc)
        kill_rank_1(proc, "0")
        wait_for_step(run, 4, proc)  # attempt 0 cannot pass step 3 without rank 1
        kill_rank_1(proc, "1")
        proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    killed_at = max(r["step"] for r in metrics_rows(run))
    again = subprocess.run(torchrun(run), cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, "\n".join(l for l in again.stderr.splitlines() if "Error" in l)[-3000:]
    a = losses(tmp_path / "full")
    b = losses(run)  # each restart logs the steps after its checkpoint again: the last entry counts
    assert sorted(a) == sorted(b) == list(range(1, 7)) and killed_at < 6
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)
    assert ckpt.complete_tags(run / "checkpoints")[-1] == "step_0000006"


def test_pretrain_refuses_an_output_dir_that_is_a_dataset_with_one_line(jargon_data, tmp_path):
    """A run written into a dataset (or an export) would be swallowed when that is replaced. The
    refusal comes after the process group is up, where DeepSpeed's CPU op used to pull in torch's
    cpp_extension and its "No CUDA runtime is found" warning (CUDA_HOME set makes it appear)."""
    dataset = Path(shutil.copytree(jargon_data, tmp_path / "data"))  # the refusal is what is tested
    before = snapshot(dataset)
    res = subprocess.run(
        pretrain_cmd(*tiny_run(dataset, dataset)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**cpu_env(), "CUDA_HOME": str(tmp_path)},
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"mosaicbert-ds pretrain: error: refusing to write a run into {dataset.resolve()}: it is a dataset; "
        "choose another folder"
    ]
    assert snapshot(dataset) == before


UNWRITABLE = """
import contextlib, io, json, sys
from mosaicbert_ds import cli
run, ro, full, corpus, tok = sys.argv[1:6]
results = []
convert = ["convert", corpus, "--tokenizer", tok, "--quiet", "--workers", "1", "--out"]
export = ["export", run]
for argv in ([*export, f"{ro}/hf"], [*convert, f"{ro}/ds"], [*export, f"{full}/hf"], [*convert, f"{full}/ds"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_read_only_and_full_outputs_are_one_line_and_leave_nothing(tmp_path):
    """A read-only file system (a read-only bind mount: as root, permission bits do not deny) is
    found before any work (exit 2); a full one (a 96 KB tmpfs) while writing (exit 5)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to mount a read-only folder and a small tmpfs")
    from tests.helpers.data import SHIPPED_TOKENIZER, jargon_docs
    from tests.helpers.glue import make_trainer_checkpoint

    run = make_trainer_checkpoint(tmp_path / "run", step=2, train_seconds=1.0).parent
    (tmp_path / "corpus.txt").write_text("\n".join(jargon_docs(1000)))
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    (ro / "kept").write_text("x")
    script = (
        'mount --bind "$RO" "$RO" && mount -o remount,ro,bind "$RO" && mount -t tmpfs -o size=96k tmpfs "$FULL" '
        '&& "$@"; rc=$?; ls -A "$FULL" > "$LISTING"; exit $rc'
    )
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sys.executable, "-c", UNWRITABLE]
        + [str(run), str(ro), str(full), str(tmp_path / "corpus.txt"), str(SHIPPED_TOKENIZER)],
        cwd=ROOT,
        env={**cpu_env(), "RO": str(ro), "FULL": str(full), "LISTING": str(tmp_path / "listing")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (code1, err1), (code2, err2), (code3, err3), (code4, err4) = json.loads(res.stdout.strip().splitlines()[-1])
    assert (code1, err1.strip()) == (
        2,
        f"mosaicbert-ds export: error: output folder {ro}/hf is not writable: {ro}: Read-only file system",
    )
    assert (code2, err2.strip()) == (
        2,
        f"mosaicbert-ds convert: error: --out {ro}/ds is not writable: {ro}: Read-only file system",
    )
    for code, err, command, dest in ((code3, err3, "export", "hf"), (code4, err4, "convert", "ds")):
        assert code == 5 and err.strip().lower().splitlines() == [
            f"mosaicbert-ds {command}: error: could not write {full}/{dest}: no space left on device; "
            "nothing there was changed"
        ], err
    assert [p.name for p in ro.iterdir()] == ["kept"]
    assert (tmp_path / "listing").read_text() == ""  # no temporary folder, lock or half-written output left
