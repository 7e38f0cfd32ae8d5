"""Elementwise work on large flat arrays: in cache-sized blocks, and in place (docs/theory.md §13.3).

A whole-array expression such as ``y += a * x`` makes a temporary as large as ``x``. For a flow's
state (megabytes, thousands of evaluations) that is a fresh allocation on every call, and its page
faults can cost more than the arithmetic. Work that needs scratch runs over blocks of ``BLOCK``
entries, whose scratch is small and stays in cache; ``add_scaled`` needs none (BLAS axpy). The
helpers take NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Entries per block: 256 KiB in float64, well inside a core's L2 cache.
BLOCK = 2**15
# Entries per BLAS axpy call: below OpenBLAS's threshold for threads (add_scaled).
AXPY_CHUNK = 2**13


def block_slices(start: int, stop: int, size: int | None = BLOCK) -> list[slice]:
    """Consecutive slices of at most ``size`` entries covering [start, stop); one slice if None."""
    if size is None:
        return [slice(start, stop)]
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]


def add_scaled(y: Any, a: float, x: Any) -> None:
    """y += a x in place, in one pass without a temporary; y and x flat (one dimension), one length.

    On NumPy float64 BLAS ``daxpy`` (its product and sum may be one fused multiply-add, so the result
    can differ from ``y + a * x`` in the last bit), in calls of at most ``AXPY_CHUNK`` entries; on
    torch ``add_`` with ``alpha``. SciPy's ``daxpy`` runs on SciPy's own OpenBLAS, whose thread pool
    is not NumPy's: a longer call woke that pool beside NumPy's, whose threads were still spinning
    after the gradient's products: with the default threads on 2 cores an ETD2 evaluation at (C, N,
    p) = (10, 1600, 64) took 276-282 ms instead of 10-12 (docs/theory.md §13.3). OpenBLAS runs an
    axpy of at most 10,000 entries on the calling thread (``interface/axpy.c``)."""
    if not isinstance(y, np.ndarray):
        y.add_(x, alpha=a)
        return
    daxpy = _daxpy()
    for part in block_slices(0, y.shape[0], AXPY_CHUNK):
        yp = y[part]
        out = daxpy(x[part], yp, a=a)
        if out is not yp:  # f2py works on a copy when y is not a contiguous float64 array
            yp[...] = out


@functools.cache
def _daxpy() -> Any:
    """SciPy's BLAS daxpy, imported at the first use (``ufm solve`` and ``--help`` import no SciPy)."""
    from scipy.linalg import blas

    return blas.daxpy
