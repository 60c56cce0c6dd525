"""Packing: whole [CLS] ... [SEP] sequences into stored rows of at most max_seq_len tokens.

`convert --pack` stores each row with the lengths of the sequences in it (the `doc_lengths`
column), so the collator gives every sequence its own cu_seqlens entry: attention never crosses
a sequence boundary and ALiBi (or a learned position) restarts at 0 in each sequence. A sequence
is never cut by packing (--split-long or truncation has already made it fit a row).

`RowPacker` places each sequence by best fit among a bounded set of open rows (the open row with
the least room left that still takes it; a new row when none does). When more rows are open
than `max_open`, the fullest is closed. Rows are emitted in the order they close and the rest
in the order they opened at `flush`, so the result depends only on the sequences given, in
order: packing one block of documents gives the same rows whatever process does it.
"""

from __future__ import annotations

import numpy as np

MIN_SEQUENCE = 3
"""[CLS], one token, [SEP]: a row with less room than this is full."""


class RowPacker:
    """Best-fit packing of sequences into rows of at most `capacity` tokens."""

    def __init__(self, capacity: int, max_open: int = 64) -> None:
        if capacity < MIN_SEQUENCE or max_open < 1:
            raise ValueError(f"capacity must be >= {MIN_SEQUENCE} and max_open >= 1, got {capacity}, {max_open}")
        self.capacity, self.max_open = capacity, max_open
        self._open: list[list[np.ndarray]] = []  # in the order they opened
        self._room: list[int] = []

    def add(self, sequence: np.ndarray) -> list[list[np.ndarray]]:
        """Place one sequence; returns the rows this closes (each a list of sequences)."""
        n = len(sequence)
        if not 0 < n <= self.capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a row of {self.capacity}")
        fits = [i for i, room in enumerate(self._room) if room >= n]
        if fits:
            i = min(fits, key=lambda j: (self._room[j], j))
            self._open[i].append(sequence)
            self._room[i] -= n
        else:
            self._open.append([sequence])
            self._room.append(self.capacity - n)
            i = len(self._open) - 1
        closed = []
        if self._room[i] < MIN_SEQUENCE:
            closed.append(self._pop(i))
        if len(self._open) > self.max_open:
            closed.append(self._pop(min(range(len(self._room)), key=lambda j: (self._room[j], j))))
        return closed

    def flush(self) -> list[list[np.ndarray]]:
        """Close every open row, in the order they opened."""
        rows, self._open, self._room = self._open, [], []
        return rows

    def _pop(self, i: int) -> list[np.ndarray]:
        self._room.pop(i)
        return self._open.pop(i)


def encode_lengths(lengths: list[int] | np.ndarray) -> bytes:
    """The `doc_lengths` column: little-endian uint32 lengths of the sequences of a row."""
    return np.asarray(lengths, dtype="<u4").tobytes()


def decode_lengths(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u4").astype(np.int64)
