"""Benchmark: the cost of one ETD2 evaluation against a hand-written gradient, and ETD2's memory.

For each (C, N, p) (n = C N = 16,000 examples, p = 64, square loss with a bias, lam = 5e-4) it times,
in one process on the same state:

* gradient   a hand-written gradient of the UFM: three matrix products (W H, R H^T, W^T R) and the
             weight-decay terms, in NumPy (``_gradient`` below), with fresh arrays as such code makes
             them: the floor of any first-order method as users write it (the issue's baseline);
* buffered   the same gradient written into preallocated arrays (``_gradient_into``): the floor
             without allocation, shown for where the time goes;
* field      the library's vector field (``ufm.dynamics.flow``'s, as ETD2 calls it: into a buffer);
* ETD2       ``gradient_flow(method="ETD2")`` for a fixed budget of evaluations: wall / evaluations,
             the best of ``--runs`` runs (the gradients are timed best-of too);
* GD         ``gradient_descent`` for the same number of steps, likewise.

and prints each per evaluation over ``gradient`` (target, issue 19: ETD2 under 1.2x), with the memory
at the peak, in copies of the state (tracemalloc, NumPy's allocations; target: under 6):

* ETD2 mem   ETD2 stepping as the driver does (the Evaluator with the field's ``field_into``, and
             ``overwrite_y0``), from a fresh copy of the start, including the field's scratch (made at
             the first evaluation);
* field mem  one evaluation of the field of a fresh system, with its input copy and its scratch;
* flow mem   a whole ``gradient_flow`` call of 40 evaluations, from the start parameters, with
             ``n_records=2``: records at 0, at t = 0.01 (interpolated: that state, one more for the
             moment, and the scratch of its loss and ||grad L||) and at the end;
* ends mem   the same call with records at 0 and at the end only (``t_eval=[0.0]``).

The targets T (C, n) are the problem's (cached on it before any of these), as for the hand-written
gradient.

Usage: python benchmarks/bench_etd2.py [--evals 200] [--runs 3] [--repeats 2]
BLAS runs on one thread unless OMP_NUM_THREADS / OPENBLAS_NUM_THREADS say otherwise, for steadier
ratios on a shared machine. With two threads on the shared 2-core machine the first row had not
finished after 15 minutes (2026-12-02): the library's axpys woke SciPy's OpenBLAS pool beside NumPy's
(docs/theory.md §13.3, "Thread pools"). Since that was fixed (2026-12-06, Intel Xeon VM, 2 cores)
one table with two threads takes 1 min 55 s, and two with one thread 3.7-4.3 minutes.
Each table is printed --repeats times, so the spread on a busy machine can be read off. The baseline
is bimodal: its fresh (p, n) arrays page-fault on some calls and not on others (3.7 against 9.0 ms
at C = 10 in two tables of one run, 2026-12-02, load average 1.6-2.0), which moves every ratio of
that row; compare rows whose ``grad ms`` agree. ETD2's step costs about 2.6-3.3 ms an evaluation at
every size here (the state is p n = 1.02M entries throughout), so its ratio falls as C grows
(docs/theory.md §13.3).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

# Before NumPy starts its BLAS pool.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ufm.dynamics import gradient_descent, gradient_flow  # noqa: E402
from ufm.dynamics.flow import _gradient_system  # noqa: E402
from ufm.dynamics.integrators import ETD2, Evaluator  # noqa: E402
from ufm.model import UFMParams, UFMProblem  # noqa: E402

SIZES = [(10, 1600, 64), (20, 800, 64), (40, 400, 64), (80, 200, 64), (160, 100, 64)]
LAM = 5e-4


def _gradient(H, W, b, T, lam):
    """Loss gradient of 1/(2n) ||W H + b 1^T - T||^2 + lam/2 (||W||^2 + ||H||^2), bias unregularized."""
    n = H.shape[1]
    R = (W @ H + b[:, None] - T) / n  # (C, n)
    return W.T @ R + lam * H, R @ H.T + lam * W, R.sum(axis=1)


def _gradient_into(H, W, b, T, lam, R, dH, dW, db):
    """``_gradient`` into preallocated R (C, n), dH (p, n), dW (C, p), db (C,)."""
    n = H.shape[1]
    np.matmul(W, H, out=R)
    R += b[:, None]
    R -= T
    R /= n
    np.matmul(W.T, R, out=dH)
    dH += lam * H
    np.matmul(R, H.T, out=dW)
    dW += lam * W
    np.sum(R, axis=1, out=db)
    return dH, dW, db


def _best(fn, repeats: int = 5) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_per_eval(run, runs: int) -> float:
    """``_best`` of ``run`` (a flow or descent of a fixed budget from a fixed start, so every call takes
    the same ``nfev``), per evaluation."""
    results = []
    return _best(lambda: results.append(run()), runs) / results[-1].nfev


def _peak_states(fn, nbytes: int) -> float:
    """Peak memory traced while ``fn`` runs, in states (tracemalloc sees NumPy's buffers)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / nbytes


def _states_held(problem: UFMProblem, start: UFMParams, steps: int) -> tuple[float, float, float, float]:
    """(ETD2 stepping as the driver does, one field evaluation, a whole flow, one without an
    interpolated record): peak memory in states, each on a fresh system (so the field's scratch, made
    at its first evaluation, is traced)."""

    def stepping(system):
        fun = Evaluator(system.field, into=system.field_into)
        solver = ETD2(
            fun, system.y0.copy(), 1e6, rtol=1e-5, atol=1e-7, linear=system.linear, overwrite_y0=True
        )
        for _ in range(steps):
            fun(solver.y)  # the driver's check of the accepted state
            solver.step()

    nbytes = _gradient_system(problem, start).y0.nbytes
    system = _gradient_system(problem, start)
    held = _peak_states(lambda: stepping(system), nbytes)
    system = _gradient_system(problem, start)
    field = _peak_states(lambda: system.field(system.y0.copy()), nbytes)
    run = dict(method="ETD2", tol=0.0, max_nfev=40, metrics=False, n_records=2, classify=False)
    flow = _peak_states(lambda: gradient_flow(problem, start, **run), nbytes)
    ends = _peak_states(lambda: gradient_flow(problem, start, t_eval=[0.0], **run), nbytes)
    return held, field, flow, ends


def _row(C: int, N: int, p: int, evals: int, runs: int) -> str:
    problem = UFMProblem(C, N, LAM, LAM)
    start = UFMParams.random(problem, p, rng=0)
    T = problem.T  # (C, n) targets
    t_grad = _best(lambda: _gradient(start.H, start.W, start.b, T, LAM))
    bufs = (np.empty_like(T), np.empty_like(start.H), np.empty_like(start.W), np.empty_like(start.b))
    t_buf = _best(lambda: _gradient_into(start.H, start.W, start.b, T, LAM, *bufs))
    system = _gradient_system(problem, start)
    y0, out = system.y0, np.empty_like(system.y0)
    t_field = _best(lambda: system.field_into(y0, out))
    run = dict(method="ETD2", tol=0.0, t_max=1e6, max_nfev=evals, metrics=False, n_records=2, classify=False)
    t_etd2 = _best_per_eval(lambda: gradient_flow(problem, start, **run), runs)
    steps = dict(lr=0.5, n_steps=evals, metrics=False, record_every=10**9, classify=False)
    t_gd = _best_per_eval(lambda: gradient_descent(problem, start, **steps), runs)
    held, field, flow, ends = _states_held(problem, start, steps=15)
    return (
        f"{C:>4} {N:>5} {p:>4} | {t_grad * 1e3:>8.3f} | {t_buf / t_grad:>8.2f} {t_field / t_grad:>6.2f}"
        f" {t_etd2 / t_grad:>6.2f} {t_gd / t_grad:>6.2f} {t_etd2 / t_gd:>8.2f} | {held:>8.1f} {field:>9.1f}"
        f" {flow:>8.1f} {ends:>8.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=200, help="evaluations per timed run (default 200)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of ETD2 and of GD, best-of (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="print the table this many times (default 2)")
    args = ap.parse_args()
    head = (
        f"{'C':>4} {'N':>5} {'p':>4} | {'grad ms':>8} | {'buffered':>8} {'field':>6} {'ETD2':>6} {'GD':>6}"
        f" {'ETD2/GD':>8} | {'ETD2 mem':>8} {'field mem':>9} {'flow mem':>8} {'ends mem':>8}"
    )
    for k in range(args.repeats):
        print(f"# table {k + 1}: time per evaluation over the hand-written gradient; peak memory in states")
        print(head)
        print("-" * len(head))
        for C, N, p in SIZES:
            print(_row(C, N, p, args.evals, args.runs), flush=True)


if __name__ == "__main__":
    main()
