"""Which integrator should be the library's default? Every method of the registry, at its own default
tolerances, on a panel of small problems, from the same seeded start to ||grad L|| < 1e-8.

The panel covers the models the library integrates: depth 1 with and without a bias (balanced,
imbalanced, label-smoothed; the decays 5e-3/2e-2 of the sweep that took 380 s a run with DOP853 at
rtol 1e-8), depth 2 linear, cross-entropy, and the benchmark size (10, 100, 64) at lam = 5e-4.
Printed per method: gradient evaluations and wall seconds per problem, the status, and the total
wall time as a ratio to the fastest method's, measured in this one process. A method "works" on a
problem when it ends stationary within its budget.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_default_method.py``
"""

from __future__ import annotations

import time

from ufm.dynamics import DEFAULT_METHOD, METHODS, gradient_flow
from ufm.model import UFMParams, UFMProblem

PANEL = {
    "(4,5,8) 5e-3/2e-2 bias": (UFMProblem(4, 5, 5e-3, 2e-2), 8),
    "(4,5,8) 5e-3/2e-2 no bias": (UFMProblem(4, 5, 5e-3, 2e-2, bias=False), 8),
    "(4,(8,4,2,1),6) 1e-2": (UFMProblem(4, (8, 4, 2, 1), 1e-2, 1e-2), 6),
    "(4,5,6) 2e-2 smoothing 0.1": (UFMProblem(4, 5, 2e-2, 2e-2, label_smoothing=0.1), 6),
    "(3,4,5) depth 2 linear 2e-2": (UFMProblem(3, 4, 2e-2, 2e-2, depth=2), 5),
    "(4,5,6) ce 1e-2": (UFMProblem(4, 5, 1e-2, 1e-2, loss="ce"), 6),
    "(10,100,64) 5e-4": (UFMProblem(10, 100, 5e-4, 5e-4), 64),
}
MAX_SECONDS = 120.0  # per run: a method that needs more than this is not a default candidate


def main() -> None:
    totals = {}
    print(f"{'problem':<28} " + " ".join(f"{m:>16}" for m in METHODS))
    rows = {}
    for label, (problem, p) in PANEL.items():
        start = UFMParams.random(problem, p, rng=0)
        cells = []
        for name in METHODS:
            totals.setdefault(name, [0.0, 0])
            t0 = time.perf_counter()
            try:
                # The integrator is timed, not the end-point classification.
                r = gradient_flow(
                    problem, start, method=name, metrics=False, n_records=2, max_seconds=MAX_SECONDS,
                    classify=False,
                )  # fmt: skip
            except ValueError:  # LSODA refuses a dense Jacobian of this size
                cells.append("refused")
                totals[name][0] += MAX_SECONDS
                continue
            wall = time.perf_counter() - t0
            ok = r.status == 1
            totals[name][0] += wall
            totals[name][1] += ok
            cells.append(f"{r.nfev:>7} {wall:6.2f}{'' if ok else '!'}")
        rows[label] = cells
        print(f"{label:<28} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    best = min(v[0] for v in totals.values())
    print("\n(cells: gradient evaluations, wall s; '!' = not stationary within the budget; a refused run")
    print(f" counts as the {MAX_SECONDS:g} s budget in the total)")
    print(f"{'method':<8} {'works on':>9} {'total wall s':>13} {'/ fastest':>10}")
    for name, (wall, ok) in totals.items():
        print(f"{name:<8} {ok:>5}/{len(PANEL):<3} {wall:13.2f} {wall / best:10.2f}")
    print(f"library default: {DEFAULT_METHOD}")


if __name__ == "__main__":
    main()
