"""What the Triton kernel test files share: on a machine without CUDA they run the kernels through
Triton's interpreter (TRITON_INTERPRET=1), in the test process when that still works, else in a
fresh one.

Triton reads TRITON_INTERPRET when it is imported (its own tl.sum & co. are @jit functions) and
when a kernel is decorated. Imported alone, a kernel test file sets it first; in a whole-suite run
pytest has already imported triton (transformers -> torch._dynamo), so the interpreted tests then
run in a fresh process (`fresh_process_test`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def enter_interpreter() -> str | None:
    """Ask for the interpreter on a CPU-only machine; returns the variable's previous value."""
    before = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    return before


def _interpreter_works_here() -> bool:
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, BLOCK))
        tl.store(x_ptr + tl.arange(0, BLOCK), x + tl.sum(x, 0))

    try:
        x = torch.ones(4)
        probe[(1,)](x, BLOCK=4)
        return bool((x == 5).all())
    except Exception:
        return False


def runs_in_process(before: str | None) -> bool:
    """True when the kernels can run in this process (compiled, or interpreted); otherwise restore
    the environment the rest of the suite had and return False."""
    if ON_GPU or _interpreter_works_here():
        return True
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before
    return False


def fresh_process_test(path: str, in_process: bool, timeout: int):
    """(autouse fixture, test) for a kernel test file: when the interpreter cannot run in this
    process every other test skips and the returned test runs the whole file in a new one."""

    @pytest.fixture(autouse=True)
    def interpreted_here(request):
        if not in_process and request.node.originalname != "test_in_fresh_interpreter":
            pytest.skip("the interpreter needs a fresh process here: test_in_fresh_interpreter runs this")

    @pytest.mark.skipif(ON_GPU or in_process, reason="the interpreter works in this process")
    def test_in_fresh_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    return interpreted_here, test_in_fresh_interpreter


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error against a reference, in float64."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))
