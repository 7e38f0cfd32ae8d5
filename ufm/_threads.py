"""One torch thread for small computations on a shared CPU (training's SVDs, critical's Hessians)."""

from __future__ import annotations

import contextlib


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
