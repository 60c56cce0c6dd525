"""Exclusive `flock` locks on output folders: one writer at a time, whatever the command.

- A run: rank 0 holds `<output_dir>/.run.lock` for the run's life (`acquire_on_rank0`); a second
  run on the same folder refuses to start. The file stays in the run folder.
- A folder that is written beside itself and swapped in (export, import, tokenizer): the writer
  holds `.<name>.mosaicbert-ds.lock` beside it (`acquire`) from its checks to the swap, and
  removes the file when done; a second writer of the same folder refuses.

The kernel drops a lock when its process dies, however it dies, so a killed writer never blocks
the next one. The lock file names the holder (pid and host) for the refusal message. On NFS,
flock needs NFSv4 locking.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..errors import UserError


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def _take(path: Path) -> tuple[int | None, str]:
    """(fd holding the lock, "") or (None, who holds it). A lock file removed by its previous
    holder between our open and our flock is opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return None, holder
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd, ""
        os.close(fd)


class OutputLock:
    """An exclusive flock, released by `release` or by the death of the process."""

    def __init__(self, fd: int | None, path: Path | None = None) -> None:
        self.fd = fd
        self.path = path
        """Removed on release (a lock beside a swapped-in folder); None: the file stays."""

    @classmethod
    def acquire(cls, path: str | os.PathLike, what: str) -> OutputLock:
        """Lock `path` (created if needed, removed on release); UserError naming the holder if
        another process holds it. `what` names the output in the message."""
        path = Path(path)
        fd, holder = _take(path)
        if fd is None:
            raise UserError(f"{what} is being written by another process ({holder}); wait for it to end")
        return cls(fd, path)

    @classmethod
    def acquire_on_rank0(cls, out_dir: Path, rank: int) -> OutputLock:
        """Rank 0 locks `<out_dir>/.run.lock`; every rank learns whether it could (a collective
        when a process group is up) and raises the same UserError if not."""
        import torch
        import torch.distributed as dist

        fd, holder = None, ""
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, holder = _take(out_dir / ".run.lock")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        busy = torch.tensor([float(rank == 0 and fd is None)], device=device)  # NCCL needs a GPU tensor
        if dist.is_initialized():
            dist.all_reduce(busy)
        if busy.item():
            where = f" ({holder})" if holder else ""
            raise UserError(
                f"output_dir {out_dir} is in use by another run{where}; wait for it to end or choose another output_dir"
            )
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            if self.path is not None:
                try:  # while still holding it: a waiting opener then sees another inode and retries
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
