"""The moment flow (docs/theory.md §11) at any N: cost per evaluation, evaluation counts, ImageNet size.

Three measurements, each a ratio within one run (wall times vary with the machine's load):

1. ``flat``: seconds per evaluation of the moment field at (C, p) = (20, 64) for N = 100 and
   N = 1,000,000 examples per class, and the ratio (target: within 1.5x). Also ``ufm flow --moments``
   (``compare_flow(..., moments=True)``) at both N, to the closed form: reached, evaluations, seconds.
2. ``counts``: gradient evaluations of the moment flow and of the full flow from the same state
   (``moments_from_params``) to 1e-6 above the closed-form loss, at (C, N, p) = (10, 100, 64),
   lam = 5e-4, per method (both at the library's default tolerances).
3. ``imagenet``: from a random start (``random_moments``: H never formed) at (C, N, p) =
   (1000, 1300, 2048), lam_w = lam_h = 1e-5, to the closed-form loss within 1e-6 relative: wall time,
   evaluations, peak memory (ru_maxrss), and the time per evaluation of the field. Integrator ETD2
   at rtol 1e-2 (atol 1e-4): the path's accuracy, not the end point's (ETD2 keeps every fixed point
   exactly, docs/theory.md §13.4); pass ``--rtol`` for another.

Run: ``python benchmarks/bench_moments.py [--parts flat,counts,imagenet] [--rtol 1e-2]`` (the ImageNet
part takes minutes on 2 cores; its per-evaluation cost is 6 C p^2 + 6 C^2 p flops, about 50 GFlop).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from ufm.dynamics import flow as flow_module
from ufm.dynamics import gradient_flow
from ufm.dynamics.moments import moments_from_params, random_moments
from ufm.experiments.compare import compare_flow
from ufm.model import UFMParams, UFMProblem

REL_TARGET = 1e-6
FLAT = dict(C=20, p=64, Ns=(100, 1_000_000), lam=3e-5)  # delta = 0.6 at N = 10^6
COUNTS = dict(C=10, N=100, p=64, lam=5e-4, methods=("ETD2", "BDF", "DOP853"))
IMAGENET = dict(C=1000, N=1300, p=2048, lam=1e-5)


def seconds_per_evaluation(problem: UFMProblem, p: int, *, repeats: int = 20) -> float:
    """Median wall time of one evaluation of the moment field at a random moment state."""
    system = flow_module._moment_system(problem, random_moments(problem, p, rng=0))
    y = system.y0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        system.field(y)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def flat() -> None:
    C, p, lam = FLAT["C"], FLAT["p"], FLAT["lam"]
    per_eval = {}
    for N in FLAT["Ns"]:
        problem = UFMProblem(C, N, lam, lam)
        per_eval[N] = seconds_per_evaluation(problem, p, repeats=200)
        t0 = time.perf_counter()
        comp = compare_flow(problem, p, seed=0, moments=True, metrics=False, tol=1e-10)
        wall = time.perf_counter() - t0
        r = comp.flow
        print(
            f"flat  C={C} N={N:>9} p={p}: {per_eval[N] * 1e6:8.1f} us/evaluation; flow --moments: "
            f"{r.message}, {r.nfev} evaluations, {wall:.1f} s ({wall / r.nfev * 1e6:.1f} us/evaluation "
            f"with the driver), loss rel err {comp.row()['loss_rel_err']:.2e}, reached {comp.reached}"
        )
    lo, hi = FLAT["Ns"]
    print(f"flat  ratio per evaluation N={hi} / N={lo}: {per_eval[hi] / per_eval[lo]:.2f} (target <= 1.5)")


def counts() -> None:
    C, N, p, lam = COUNTS["C"], COUNTS["N"], COUNTS["p"], COUNTS["lam"]
    problem = UFMProblem(C, N, lam, lam)
    target = problem.loss.closed_form(problem).loss * (1 + REL_TARGET)
    start = UFMParams.random(problem, p, rng=0)
    for method in COUNTS["methods"]:
        out = []
        for label, x in (("full", start), ("moments", moments_from_params(problem, start))):
            t0 = time.perf_counter()
            r = gradient_flow(problem, x, method=method, target_loss=target, metrics=False, n_records=2)
            out.append((label, r.nfev, time.perf_counter() - t0, r.status))
        (_, nf, wf, sf), (_, nm, wm, sm) = out
        print(
            f"counts ({C}, {N}, {p}) {method:>6}: full {nf} evaluations {wf:.1f} s (status {sf}); "
            f"moments {nm} evaluations {wm:.1f} s (status {sm}); evaluations moments/full {nm / nf:.2f}, "
            f"wall full/moments {wf / wm:.1f}"
        )


def imagenet(rtol: float, max_seconds: float, progress: bool) -> None:
    C, N, p, lam = IMAGENET["C"], IMAGENET["N"], IMAGENET["p"], IMAGENET["lam"]
    problem = UFMProblem(C, N, lam, lam)
    opt = problem.loss.closed_form(problem)
    t0 = time.perf_counter()
    start = random_moments(problem, p, rng=0)
    t_start = time.perf_counter() - t0
    per_eval = seconds_per_evaluation(problem, p, repeats=3)
    t0 = time.perf_counter()
    r = gradient_flow(problem, start, method="ETD2", rtol=rtol, atol=rtol * 1e-2, t_max=1e9,
                      target_loss=opt.loss * (1 + REL_TARGET), metrics=False, n_records=2, max_seconds=max_seconds,
                      progress=progress)  # fmt: skip
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux -> GiB
    rel = (r.loss[-1] - opt.loss) / opt.loss
    print(
        f"imagenet (C, N, p) = ({C}, {N}, {p}), lam = {lam:g}, ETD2 rtol {rtol:g}: {r.message}; "
        f"{r.nfev} evaluations, {wall:.0f} s ({wall / r.nfev:.2f} s/evaluation; the field alone "
        f"{per_eval:.2f} s), start {t_start:.1f} s, t = {r.t_final:.4g}, loss {r.loss[-1]:.10g} vs closed "
        f"form {opt.loss:.10g} (rel {rel:.2e}), peak memory {peak:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="flat,counts,imagenet")
    parser.add_argument("--rtol", type=float, default=1e-2, help="ETD2's rtol for the ImageNet part")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="budget of the ImageNet flow")
    parser.add_argument("--progress", action="store_true", help="progress bar of the ImageNet flow")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "flat" in parts:
        flat()
    if "counts" in parts:
        counts()
    if "imagenet" in parts:
        imagenet(args.rtol, args.max_seconds, args.progress)


if __name__ == "__main__":
    main()
