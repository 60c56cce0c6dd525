"""One streaming dataset registers its shared memory at a time on a host.

mosaicml-streaming names a dataset's shared memory after the first free prefix number
(`/dev/shm/NNNNNN_locals`, ...). It looks for a free number and then creates it, without a lock
between the two: two jobs that start on one host at the same moment (two single-GPU runs, a run
and its eval job) find the same number, and the second fails with `FileExistsError: ...
'/NNNNNN_locals'`. `one_registration_per_host()` closes that window: each job's local leader
(streaming's, so also where several node ranks share a host) holds an exclusive lock on a file
beside the shared memory while its job builds the dataset, and the job's other ranks look for
their prefix only while their leader holds it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "mosaicbert_ds_streaming_registration.lock"


def lock_path() -> Path:
    """The lock file: in /dev/shm, whose namespace the prefixes live in (a container with its own
    /dev/shm gets its own lock), else in the temporary folder."""
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())) / LOCK_NAME


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def one_registration_per_host() -> Iterator[None]:
    """Build a StreamingDataset inside this block on every rank (a collective, as the dataset
    is): on each host, one job at a time registers its shared memory."""
    from streaming.base.world import World

    fd = None
    if World.detect().is_local_leader:
        # read-only is enough for flock, so a lock file another user created works too
        fd = os.open(lock_path(), os.O_RDONLY | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        _barrier()  # the other ranks of this host start looking only under their leader's lock
        yield
        _barrier()  # and have all found it before the lock passes to another job
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
