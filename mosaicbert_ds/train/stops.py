"""Why a run ends, how it says so, and the signals that ask it to stop.

Exit codes of `mosaicbert-ds pretrain` (docs/reliability.md has the table):

    0    finished: every step ran, the final checkpoint is complete
    1    crashed (an unexpected exception; its traceback is printed)
    2    refused: bad input (run file, data, output folder in use, incomplete checkpoint)
    3    diverged: too many consecutive non-finite steps (or non-finite weights at a save)
    4    stopped early and resumable: a signal (SIGTERM, SIGUSR1, SIGINT), duration.wall_time or
         --stop-after; a complete checkpoint of the last step was written
    5    a checkpoint could not be written (disk full, I/O error); the previous one is intact
    130  aborted by a second SIGINT: no checkpoint of the current step
"""

from __future__ import annotations

import os
import signal
import sys
import time
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1
    USER_ERROR = 2
    DIVERGED = 3
    STOPPED = 4
    SAVE_FAILED = 5
    ABORTED = 130


class RunStopped(Exception):
    """Ends the run with `code` and one line (`message`), without a traceback."""

    def __init__(self, code: ExitCode, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.summary = summary or {}


# reasons a rank may ask every rank to stop (agreed at the next log interval); higher wins
SIGNAL, WALL_TIME = 2, 1
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGINT: "SIGINT"}


class StopRequests:
    """Records SIGTERM / SIGUSR1 / SIGINT instead of dying; a second SIGINT (more than a second
    after the first: launchers forward the terminal's Ctrl-C, so one press can arrive twice)
    exits at once with code 130."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_sigint = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if self._previous:  # already installed
            return
        for signum in _NAMES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self._first_sigint and now - self._first_sigint > 1.0:
            os.write(2, b"mosaicbert-ds pretrain: aborted by a second SIGINT (no checkpoint of this step)\n")
            os._exit(int(ExitCode.ABORTED))
        if signum == signal.SIGINT and not self._first_sigint:
            self._first_sigint = now
        if self.signal_name is None:
            self.signal_name = _NAMES[signum]


_early: StopRequests | None = None


def _is_pretrain_cli(argv: list[str]) -> bool:
    """`mosaicbert-ds pretrain ...` or `python [opts] -m mosaicbert_ds.cli [--local_rank=N] pretrain ...`."""
    if "-m" in argv[:-1]:
        rest = argv[argv.index("-m") + 1 :]
        if rest[0] != "mosaicbert_ds.cli":
            return False
        rest = rest[1:]
    elif argv and os.path.basename(argv[0]) == "mosaicbert-ds":
        rest = argv[1:]
    else:
        return False
    rest = [a for a in rest if not a.startswith("--local_rank")]
    return bool(rest) and rest[0] == "pretrain"


def record_early() -> None:
    """Called first thing when the package is imported: in a `pretrain` process, start recording
    stop signals at once, before the seconds of heavy imports, so that a signal that comes while
    the run is still starting stops it cleanly (exit 4) instead of killing it. Other processes
    (a library user's, other commands) keep their own handlers."""
    global _early
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if _early is None and _is_pretrain_cli(argv):
        _early = StopRequests()
        _early.install()


def stop_requests() -> StopRequests:
    """The recorder installed by record_early(), or a fresh one (install it before the run starts)."""
    return _early if _early is not None else StopRequests()


def parse_duration(text: str) -> float:
    """'3h50m', '90m', '45s', '1h' or a number of seconds -> seconds."""
    import re

    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or not match:
        raise ValueError(f"not a duration like 3h50m: {text!r}")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s
