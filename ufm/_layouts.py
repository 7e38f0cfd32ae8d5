"""Pass 2's thin product in the faster of its two layouts on the CPU at hand (docs/theory.md §17.10).

``nc_metrics``' second pass multiplies row blocks of the features (b, p) by a thin basis (p, k),
k = r + C, and wants the result as (k, b). Two layouts give it: ``basis_first`` computes
(k, p) @ (p, b) into the result, ``rows_first`` computes (b, p) @ (p, k) and copies its transpose in.
Which is faster depends on the BLAS and the processor, not only on the shapes, and by more than the
noise. Measured with one thread at (50k, 512), k = 19, float64 (``benchmarks/bench_metrics.py``'s size):

* on an Intel Xeon (2026-12-03), torch took 34.5 ms basis first and 28.0 ms rows first (and NumPy,
  which did NumPy features' products until the row parts of docs/theory.md §17.10, 38.8 and 56.0 ms);
* when the fixed layouts were chosen (2026-11-30, commit ca8bcb0, that session's machine), torch's
  float64 product was up to 3x faster basis first (r + C = 19 and 28).

So each process times both layouts once for each (dtype, p, k, block rows), on the first full product
block it meets. It keeps ``basis_first`` unless ``rows_first`` took under ``SWITCH_MARGIN`` of its
time, which keeps the choice stable where the two are close. The two layouts can differ in the last
bits of the products, since the BLAS kernels sum in different orders: well inside the accuracy that
``nc_metrics`` states, but a result is bit-for-bit reproducible only within one choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

# The challenger must take under this fraction of the incumbent's time to replace it.
SWITCH_MARGIN = 0.9
# Alternating timed runs of each layout; the best of them counts.
TRIALS = 3

Layout = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_chosen: dict[tuple, Layout] = {}


def basis_first(out: torch.Tensor, basis_t: torch.Tensor, basis: torch.Tensor, block: torch.Tensor) -> None:
    """out (k, b) = basis_t (k, p) @ block.T as one product into ``out``; ``basis`` (p, k) is unused."""
    torch.mm(basis_t, block.T, out=out)


def rows_first(out: torch.Tensor, basis_t: torch.Tensor, basis: torch.Tensor, block: torch.Tensor) -> None:
    """out (k, b) = (block (b, p) @ basis (p, k)).T: the product, then a copy of its transpose (b k
    entries, in cache); ``basis_t`` is unused."""
    out.copy_((block @ basis).T)


def chosen() -> dict[tuple, str]:
    """The layouts this process has chosen, by (dtype, p, k, block rows): for the record."""
    return {key: layout.__name__ for key, layout in _chosen.items()}


def faster_layout(
    key: tuple,
    incumbent: Layout,
    challenger: Layout,
    run: Callable[[Layout], None],
    clock: Callable[[], float] = time.perf_counter,
) -> Layout:
    """The layout for products of ``key``: ``incumbent`` unless ``challenger`` took under SWITCH_MARGIN
    of its time, best of TRIALS alternating calls of ``run(layout)``; timed once per key and process.
    ``clock``: seconds, for the timings."""
    layout = _chosen.get(key)
    if layout is None:
        best = {incumbent: math.inf, challenger: math.inf}
        for _ in range(TRIALS):
            for candidate in best:
                start = clock()
                run(candidate)
                best[candidate] = min(best[candidate], clock() - start)
        layout = challenger if best[challenger] < SWITCH_MARGIN * best[incumbent] else incumbent
        _chosen[key] = layout
    return layout
