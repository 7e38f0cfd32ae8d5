"""Gradient evaluations and wall time to reach 1e-6 relative error in the closed-form loss: ODE vs GD.

GD runs at its largest stable step 2/lambda_max, with lambda_max the top Hessian eigenvalue at the
closed-form minimizer, estimated by power iteration on Hessian-vector products by central finite
differences of the analytic gradient (``top_hessian_eigenvalue``); we use 0.95 * 2/lambda_max so
the top mode still contracts. With a bias lambda_max is a little above 1 + lam_b, the bias block's own
curvature (1.0095 at (10, 100, 64)).

The integrators run from the same start to the same target; ``GD/evals`` and ``GD/wall`` are GD's
gradient evaluations and wall time over theirs. Evaluation counts are deterministic; wall times vary
with the machine's load (GD's per-step time varied 2x between runs on the 2-core CI machine).

A run is ``METHOD:RTOL`` (atol = RTOL/100), ``METHOD`` (the integrator's own ``default_tolerances``)
or ``default`` (the library's default: ``DEFAULT_METHOD`` at its default tolerances, as ``ufm flow``,
the sweeps and ``ufm reproduce`` use it).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_flow.py [--sizes small|large|both] [--runs ETD2:1e-3,...]``
(the large size takes about 5 minutes, most of it GD).
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np

from ufm.closed_form import ufm_optimum
from ufm.dynamics import DEFAULT_METHOD, METHODS, gradient_descent, gradient_flow
from ufm.model import UFMParams, UFMProblem, loss_and_grad

REL_TARGET = 1e-6
SIZES = {"small": [(10, 100, 64)], "large": [(100, 50, 256)]}
SIZES["both"] = SIZES["small"] + SIZES["large"]
LAM = 5e-4
DEFAULT_RUNS = "default,ETD2:1e-2,ETD2:1e-3,ETD2:1e-4,BDF:1e-5,DOP853:1e-8"
DEFAULT_TOL = inspect.signature(gradient_flow).parameters["tol"].default
STEP_MARGIN = 0.95  # below 2/lambda_max: at exactly 2/lambda_max the top mode does not contract


def top_hessian_eigenvalue(problem, params, *, iters=60, h=1e-6, seed=0) -> float:
    """Power iteration on H v = (grad(x + h v) - grad(x - h v)) / 2h."""
    x = params.ravel()

    def grad(theta):
        return loss_and_grad(problem, UFMParams.unravel(params, theta))[1].ravel()

    v = np.random.default_rng(seed).standard_normal(x.size)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        hv = (grad(x + h * v) - grad(x - h * v)) / (2 * h)
        lam = float(v @ hv)
        v = hv / np.linalg.norm(hv)
    return lam


def parse_run(item: str) -> tuple[str | None, float | None, str]:
    """``default``, ``METHOD`` or ``METHOD:RTOL`` -> (method, rtol, label); None is the library's default."""
    if item == "default":
        return None, None, f"{DEFAULT_METHOD} (default)"
    method, _, rtol = item.partition(":")
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; valid: default, {', '.join(METHODS)}")
    if not rtol:
        return method, None, f"{method} (its rtol)"
    return method, float(rtol), f"{method} rtol={float(rtol):g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=list(SIZES), default="small")
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help=f"comma-separated runs: default, METHOD or METHOD:RTOL (default {DEFAULT_RUNS})")  # fmt: skip
    args = ap.parse_args()
    runs = [parse_run(item) for item in args.runs.split(",")]
    rows = []
    for C, N, p in SIZES[args.sizes]:
        problem = UFMProblem(C, N, LAM, LAM)
        opt = ufm_optimum(C, N, LAM, LAM)
        target = opt.loss * (1 + REL_TARGET)
        start = UFMParams.random(problem, p, rng=0)
        lam_max = top_hessian_eigenvalue(problem, opt.build(p, rng=0))
        lr = STEP_MARGIN * 2 / lam_max
        t0 = time.perf_counter()
        gd = gradient_descent(problem, start, lr=lr, n_steps=200_000, target_loss=target, metrics=False,
                              record_every=10**9, classify=False)  # fmt: skip
        base = (gd.nfev, time.perf_counter() - t0)
        rows.append((C, N, p, f"GD lr={lr:.3f}", *base, gd.loss[-1] / opt.loss - 1, gd.message, base))
        for m, rtol, label in runs:
            if rtol is None:
                # The tolerances of a default run (stationarity at gradient_flow's tol); this benchmark
                # itself stops at the target loss (tol = 0), which those tolerances are not set for.
                rtol, atol = METHODS[m or DEFAULT_METHOD].default_tolerances(DEFAULT_TOL)
            else:
                atol = rtol * 1e-2
            t0 = time.perf_counter()
            r = gradient_flow(problem, start, method=m, target_loss=target, tol=0.0, rtol=rtol, atol=atol,
                              t_max=1e6, metrics=False, n_records=2, classify=False)  # fmt: skip
            wall = time.perf_counter() - t0
            rows.append((C, N, p, label, r.nfev, wall, r.loss[-1] / opt.loss - 1, r.message, base))
    print(f"{'C':>4} {'N':>4} {'p':>4}  {'method':<18} {'grad evals':>10} {'wall s':>8} {'rel err':>9} "
          f"{'GD/evals':>8} {'GD/wall':>8}  stop")  # fmt: skip
    for C, N, p, name, nfev, wall, err, msg, (gd_nfev, gd_wall) in rows:
        print(f"{C:>4} {N:>4} {p:>4}  {name:<18} {nfev:>10d} {wall:>8.2f} {err:>9.2e} "
              f"{gd_nfev / nfev:>8.1f} {gd_wall / wall:>8.1f}  {msg}")  # fmt: skip


if __name__ == "__main__":
    main()
