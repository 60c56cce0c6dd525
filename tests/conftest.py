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


@pytest.fixture(scope="module")
def one_gloo_rank():
    """A one-rank gloo process group in this process, as `pretrain` starts on a CPU (for a real
    DeepSpeed engine in the test). init_distributed exports MASTER_PORT, RANK, WORLD_SIZE and the
    like; the environment is put back afterwards, so that later tests' subprocesses do not take
    this group's port (EADDRINUSE) or rank for their own."""
    from mosaicbert_ds.train.distributed import init_distributed

    saved = dict(os.environ)
    init_distributed()
    yield
    os.environ.clear()
    os.environ.update(saved)
