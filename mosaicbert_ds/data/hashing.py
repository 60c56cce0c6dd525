"""Counter-based random numbers: a fixed hash of integer keys instead of a seeded generator.

Masking and the train/val split need numbers that depend only on (seed, epoch, sample, position)
and not on the order or grouping in which they are computed. Hashing the keys with the
splitmix64 finaliser gives exactly that, vectorised over a whole batch in a few numpy ops
(a generator per sample costs tens of microseconds).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Hash uint64 values (elementwise, wrapping arithmetic); nearby inputs give unrelated outputs."""
    x = np.asarray(x, dtype=np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def combine(key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Hash of (key, value): chain keys one after another."""
    return splitmix64(np.asarray(key, dtype=np.uint64) ^ np.asarray(value, dtype=np.uint64))


def to_unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits of a hash."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
