"""Simulate the gradient flow of UFM variants and plot their NC measures against the closed form.

    python examples/simulate_variant_flow.py [--quick] [--out DIR]

Four variants from the same kind of random start: the poster's balanced square-loss UFM (its closed
form is docs/theory.md §5, drawn dashed), a deep linear UFM (two layers after H), cross-entropy,
and imbalanced counts (8, 4, 2). Each has a closed form (docs/theory.md §7, §9, §8), drawn dashed;
a variant without one (say ``lam_b`` > 0 with imbalanced counts) still runs, and the figure says so
instead of drawing a reference. Everything goes through the public API:
``ufm.UFMProblem`` and ``ufm.compare_flow`` (the library's default integrator and tolerances).
``--quick`` (the test suite's mode) stops every flow after a short time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import ufm  # noqa: E402

VARIANTS = {
    "balanced square loss": ufm.UFMProblem(3, 4, 0.02, 0.02),
    "deep linear (depth 2)": ufm.UFMProblem(3, 4, 0.02, 0.02, depth=2),
    "cross-entropy": ufm.UFMProblem(3, 4, 0.02, 0.02, loss="ce"),
    "imbalanced (8, 4, 2)": ufm.UFMProblem(3, (8, 4, 2), 0.02, 0.02),
}
MEASURES = ("nc1", "nc3", "eps")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short flows (seconds), as in the test suite")
    parser.add_argument("--out", default="runs/examples", help="directory for variant_flows.png")
    args = parser.parse_args(argv)
    budget = dict(t_max=20.0, max_seconds=5.0) if args.quick else dict(t_max=1e5, max_seconds=120.0)

    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(4 * len(VARIANTS), 3.6), sharey=True)
    for ax, (name, problem) in zip(axes, VARIANTS.items()):
        comparison = ufm.compare_flow(problem, 5, seed=0, tol=1e-8, **budget)
        flow, row = comparison.flow, comparison.row()
        t = np.maximum(flow.t, flow.t[flow.t > 0].min())  # t = 0 drawn at the first t > 0
        for key in MEASURES:
            # |eps|: with cross-entropy the correct logit exceeds 1, and eps = 1 - it is negative
            (line,) = ax.plot(t, np.abs(flow.metrics[key]), label=f"|{key}|" if key == "eps" else key)
            if key == "eps" and comparison.optimum is not None:
                ax.axhline(comparison.optimum.eps, ls="--", color=line.get_color(), label="eps, closed form")
        note = "closed form dashed" if comparison.optimum is not None else "no closed form"
        ax.set(xscale="log", yscale="log", xlabel="t", title=f"{name}\n({note})")
        end = {k: row[k] for k in ("loss", "eps", "nc1")}
        reference = (
            ""
            if comparison.optimum is None
            else f"; closed form loss {row['cf_loss']:.6g}, eps {row['cf_eps']:.6g}"
        )
        print(
            f"{name}: {flow.message}; loss {end['loss']:.6g}, eps {end['eps']:.6g}, NC1 {end['nc1']:.3g}{reference}"
        )
    axes[0].legend(fontsize=8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "variant_flows.png", dpi=120)
    print(f"wrote {out / 'variant_flows.png'}")


if __name__ == "__main__":
    main()
