"""Threads for CPU work: one torch thread for small computations on a shared CPU (training's SVDs,
critical's Hessians), row parts of a big computation run side by side on our own threads
(``nc_metrics``' passes, docs/theory.md §17.10), SciPy's own BLAS on one thread beside NumPy's
(L-BFGS-B), and a sweep worker's pools on its share of the cores (docs/theory.md §13.3)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


@contextlib.contextmanager
def one_torch_thread():
    """Run the enclosed torch work on one CPU thread, then restore the count.

    Small LAPACK calls and Hessian-vector products lose to thread spinning on a busy CPU: measured on
    the shared 2-core machine, a multithreaded SVD of a 256 x 784 matrix was 40x slower than a
    single-threaded one, and a Hessian-vector product at (C, N, p) = (4, 5, 4) took 25 ms with two
    threads and 0.7 ms with one.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def scipy_blas_on_one_thread():
    """Run the enclosed SciPy work with the BLAS that SciPy's wheel brings on one thread.

    SciPy's wheels bundle an OpenBLAS of their own beside NumPy's, each with its own pool of threads,
    and a pool that has just worked keeps its threads spinning (docs/theory.md §13.3). L-BFGS-B's
    vector operations run on SciPy's; the gradients between them on NumPy's. With both pools on the
    2-core Intel Xeon VM (2026-12-06, ``benchmarks/bench_lbfgs.py``), an evaluation of
    ``minimize_loss`` at (C, N, p) = (10, 100, 64) took 27.0 ms, its gradient 3.5 ms (0.3 ms alone);
    with SciPy's on one thread 10.4 ms. At 1.0M parameters, (10, 1600, 64): 268 against 193 ms.
    Only libraries installed inside SciPy's own package are limited: where SciPy links the BLAS
    NumPy uses (conda, Linux distributions) there is one pool, left as it is. The counts are
    restored on exit.
    """
    limited = _scipy_own_blas()
    if limited is None:
        yield
        return
    with limited.limit(limits=1):
        yield


@functools.cache
def _scipy_own_blas() -> Any:
    """A ``threadpoolctl.ThreadpoolController`` of the BLAS libraries loaded from SciPy's installed
    package (``scipy/`` or its wheel's ``scipy.libs/``), or None where there are none."""
    import scipy
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, so that it is found)
    from threadpoolctl import ThreadpoolController

    package = os.path.realpath(os.path.dirname(scipy.__file__))
    roots = (os.path.join(package, ""), os.path.join(package + ".libs", ""))
    controller = ThreadpoolController().select(user_api="blas")
    own = [
        lib.filepath for lib in controller.lib_controllers if os.path.realpath(lib.filepath).startswith(roots)
    ]
    return controller.select(filepath=own) if own else None


# This process's share of the cores when it is one of several workers on them (limit_process_threads).
_share: int | None = None


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS tells it (else all), at most
    its share as a sweep worker (:func:`limit_process_threads`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores if _share is None else min(cores, _share)


def limit_process_threads(threads: int) -> None:
    """Run every thread pool of this process on ``threads`` threads from now on: BLAS and OpenMP
    already loaded (NumPy's, SciPy's; through ``threadpoolctl``), torch's, and those of libraries
    loaded later (their environment variables). For a worker process of a local sweep, beside
    others on the same cores: each worker's libraries start one thread a core, and with two
    workers on 2 cores a flow run took 1.7-17 s instead of 0.4-0.6 s (docs/theory.md §13.3). The
    share also bounds :func:`usable_cores`, so that training measures in line rather than on a
    core another worker runs on."""
    global _share
    _share = threads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def row_parts(n: int, block_rows: int, parts: int) -> list[slice]:
    """[0, n) cut into at most ``parts`` contiguous slices of whole blocks of ``block_rows`` rows (the
    last block may be shorter), as even as the blocks allow; one slice when there is one block."""
    blocks = -(-n // max(block_rows, 1))
    parts = max(1, min(parts, blocks))
    edges = [min(n, (blocks * i // parts) * block_rows) for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(edges, edges[1:])]


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The process's pool for :func:`side_by_side`, made again after a fork (a child has none of its
    parent's threads, so the parent's pool would never run its work)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max(1, (os.cpu_count() or 1) - 1), "ufm-rows"))
        return _pool[1]


def side_by_side(work: Callable[[slice, int], Any], parts: Sequence[slice]) -> list[Any]:
    """``[work(part, i) for i, part in enumerate(parts)]``, the first part on the calling thread and the
    others on the pool's threads at the same time; an exception in any part is raised here.

    For torch work that runs on one thread each (:func:`one_torch_thread`): the parts then use the
    cores without waking any library's pool, whose threads keep spinning after their work (NumPy's
    BLAS for about 0.1 s after a matmul on the 2-core AMD VM; docs/theory.md §17.10). Worth it for
    work of at least a block per part: a hand-off costs about 0.1 ms there.
    """
    if len(parts) == 1:
        return [work(parts[0], 0)]
    others = [_executor().submit(_on_one_thread, work, part, i) for i, part in enumerate(parts[1:], start=1)]
    first = work(parts[0], 0)
    return [first] + [future.result() for future in others]


def _on_one_thread(work: Callable[[slice, int], Any], part: slice, i: int) -> Any:
    """work(part, i) on a pool thread, whose torch thread count is its own: it is fixed the first time
    the thread runs a parallel torch operation, so it is checked rather than assumed."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return work(part, i)
