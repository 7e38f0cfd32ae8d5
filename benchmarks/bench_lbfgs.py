"""Benchmark: ``ufm.minimize_loss`` (L-BFGS-B) with SciPy's own BLAS on one thread, against both BLAS
pools left on their default threads.

SciPy's wheels bundle an OpenBLAS beside NumPy's (docs/theory.md §13.3). L-BFGS-B's vector work runs
on SciPy's, the gradients between its steps on NumPy's, and a pool that has just worked keeps its
threads spinning. ``minimize_loss`` runs L-BFGS-B inside ``ufm._threads.scipy_blas_on_one_thread``;
this times it per evaluation, with that context and with it replaced by a no-op, alternating in one
process (``--rounds`` times each), from one random start, for ``--iterations`` L-BFGS iterations (the
library's ``MAXITER`` lowered for the run). It also prints one gradient alone, the part of an
evaluation that is NumPy's, and the gradient's time inside L-BFGS-B (timed around each call).

Run it with the default threads: with ``OMP_NUM_THREADS=1`` there is one thread per pool and nothing
to compare.

Usage: python benchmarks/bench_lbfgs.py [--rounds 2] [--iterations 60]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np

from ufm import UFMParams, UFMProblem, optimize
from ufm.model import loss_and_grad

SIZES = [(10, 100, 64), (10, 400, 64), (10, 1600, 64)]


def _timed_run(problem: UFMProblem, p: int, limited: bool) -> tuple[float, float]:
    """(ms per evaluation, ms per gradient inside the run) of one minimize_loss call."""
    inside = [0.0]

    def timed_loss_and_grad(*args, **kwargs):
        t0 = time.perf_counter()
        out = loss_and_grad(*args, **kwargs)
        inside[0] += time.perf_counter() - t0
        return out

    saved = optimize.loss_and_grad, optimize.scipy_blas_on_one_thread
    optimize.loss_and_grad = timed_loss_and_grad
    if not limited:
        optimize.scipy_blas_on_one_thread = contextlib.nullcontext
    try:
        t0 = time.perf_counter()
        res = optimize.minimize_loss(problem, p, n_starts=1, classify=False)
        total = time.perf_counter() - t0
    finally:
        optimize.loss_and_grad, optimize.scipy_blas_on_one_thread = saved
    # nfev counts L-BFGS-B's evaluations; minimize_loss adds one for the end point's gradient norm.
    calls = res.nfev + 1
    return 1e3 * total / calls, 1e3 * inside[0] / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each case, alternating")
    parser.add_argument("--iterations", type=int, default=60, help="L-BFGS iterations per run")
    args = parser.parse_args()
    optimize.MAXITER = args.iterations
    print(f"# minimize_loss, one start, {args.iterations} L-BFGS-B iterations, OMP_NUM_THREADS ="
          f" {os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        "# ms per evaluation (best of the rounds); grad: ms per gradient inside the run; alone: one gradient"
    )
    header = (
        f"{'C':>4} {'N':>5} {'p':>4} {'params':>8} | {'both pools':>10} {'grad':>6} |"
        f" {'SciPy on 1':>10} {'grad':>6} | {'alone':>6} | {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for C, N, p in SIZES:
        problem = UFMProblem(C, N, 5e-4, 5e-4)
        x = UFMParams.random(problem, p, rng=np.random.default_rng(0))
        alone = min(_gradient_ms(problem, x) for _ in range(3))
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            for limited in (False, True):
                runs[limited].append(_timed_run(problem, p, limited))
        both, one = (min(runs[limited]) for limited in (False, True))  # the fastest run of each
        print(
            f"{C:>4} {N:>5} {p:>4} {x.ravel().size:>8} | {both[0]:>10.1f} {both[1]:>6.1f} |"
            f" {one[0]:>10.1f} {one[1]:>6.1f} | {alone:>6.1f} | {one[0] / both[0]:>6.2f}",
            flush=True,
        )


def _gradient_ms(problem: UFMProblem, x: UFMParams) -> float:
    """One gradient's wall time, ms."""
    t0 = time.perf_counter()
    loss_and_grad(problem, x)
    return 1e3 * (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
