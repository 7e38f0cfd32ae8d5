"""Elementwise work on large flat arrays in cache-sized blocks (docs/theory.md §13.3).

A whole-array expression such as ``y += a * x`` makes a temporary as large as ``x``. For a flow's
state (megabytes, thousands of evaluations) that is a fresh allocation on every call, and its page
faults can cost more than the arithmetic. Over blocks of ``BLOCK`` entries the temporaries are small
and stay in the L2 cache. The helpers take NumPy arrays and torch tensors alike (slicing and in-place
operators only).
"""

from __future__ import annotations

from typing import Any

# Entries per block: 256 KiB in float64, well inside a core's L2 cache.
BLOCK = 2**15


def block_slices(start: int, stop: int, size: int | None = BLOCK) -> list[slice]:
    """Consecutive slices of at most ``size`` entries covering [start, stop); one slice if None."""
    if size is None:
        return [slice(start, stop)]
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]


def add_scaled(y: Any, a: float, x: Any) -> None:
    """y += a x in place, block by block; y and x flat (one dimension) and of the same length."""
    for block in block_slices(0, y.shape[0]):
        y[block] += a * x[block]
