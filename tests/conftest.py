"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run faster on one thread, and results do not depend on the machine's cores.
    Modules that train use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _gloo_group() -> dict[str, str]:
    """Start the one-rank gloo group once per session (DeepSpeed keeps references to it, so it
    cannot be closed and started again) and return the variables init_distributed exported."""
    from mosaicbert_ds.train.distributed import init_distributed

    saved = dict(os.environ)
    init_distributed()
    exported = {k: v for k, v in os.environ.items() if saved.get(k) != v}
    os.environ.clear()
    os.environ.update(saved)
    return exported


@pytest.fixture(scope="module")
def one_gloo_rank(_gloo_group: dict[str, str]):
    """A one-rank gloo process group in this process, as `pretrain` starts on a CPU (for a real
    DeepSpeed engine in the test). MASTER_PORT, RANK, WORLD_SIZE and the like are set only while
    the module runs, so that later tests' subprocesses do not take this group's port (EADDRINUSE)
    or rank for their own."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _gloo_group.items():
            patch.setenv(key, value)
        yield
