"""Scripts as torch.distributed ranks in fresh processes: one rank of a script that prints JSON
on its last line (the environment `deepspeed.initialize` expects), and several loader ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, timeout: int = 600) -> dict:
    """Run `python -c SCRIPT ARGS` as rank 0 of 1 and return the JSON of its last stdout line."""
    from tests.helpers.runs import free_port

    port = free_port()
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOADER_RANK = Path(__file__).resolve().parent / "loader_rank.py"


def run_loader_ranks(world: int, cfg: dict, tmp_path: Path, env: dict[str, str] | None = None) -> list[dict]:
    """Run `world` real data-parallel ranks (gloo, one process each) of tests/helpers/loader_rank.py
    with `cfg` (and the extra variables `env`); returns what each rank wrote, in rank order."""
    from tests.helpers.runs import free_port

    port = free_port()
    procs, outs = [], []
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(LOADER_RANK), json.dumps({**cfg, "out": str(out)})],
                env=rank_env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [json.loads(o.read_text()) for o in outs]
