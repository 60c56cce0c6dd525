"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def _unchanged(folder: Path) -> Iterator[Path]:
    """Yield `folder`, then fail if a test changed or removed a file under it or added one other
    than what reading it leaves: a decompressed shard `X.mds` beside its compressed `X.mds.zstd`
    and the stamp `X.mds.checked` (mosaicbert_ds.data.dataset.CheckedStream)."""
    from mosaicbert_ds.data.dataset import STAMP_SUFFIX
    from tests.helpers.runs import snapshot

    before = snapshot(folder)
    yield folder
    after = snapshot(folder)
    compressed = {name.rsplit(".", 1)[0] for name in before if ".mds." in name}
    read_copies = {name for name in after.keys() - before.keys() if name.removesuffix(STAMP_SUFFIX) in compressed}
    changed = sorted(k for k in before.keys() | after.keys() - read_copies if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared dataset {folder}: {changed[:10]}"


@pytest.fixture(scope="session")
def jargon_data(tmp_path_factory) -> Iterator[Path]:
    """The bundled Jargon File as `prepare_default_corpus` makes it by default (WordPiece 8192,
    128-token samples, 5% held out), built once per session. Tests only read it (the session fails
    if a file under it changes); a test that must write into it copies it first
    (`shutil.copytree` into its tmp_path)."""
    from mosaicbert_ds.data import prepare_default_corpus

    yield from _unchanged(prepare_default_corpus(tmp_path_factory.mktemp("jargon") / "jargon"))


@pytest.fixture(scope="session")
def jargon_data_2048(tmp_path_factory) -> Iterator[Path]:
    """The same with the quickstart's vocabulary of 2048 tokens, built once per session, read only."""
    from mosaicbert_ds.data import prepare_default_corpus

    yield from _unchanged(prepare_default_corpus(tmp_path_factory.mktemp("jargon") / "jargon", vocab_size=2048))


@pytest.fixture(scope="session")
def loader_data(tmp_path_factory) -> Iterator[Path]:
    """600 documents (64 held out) in several shards, the session tokenizer: what the loader and
    preflight tests read (`tests.helpers.data.loader_dataset`), built once per session."""
    from tests.helpers.data import loader_dataset

    yield from _unchanged(loader_dataset(tmp_path_factory))
