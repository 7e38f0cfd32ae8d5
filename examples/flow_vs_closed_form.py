"""Gradient flow from a random start against the closed form, through the library's one comparison.

    python examples/flow_vs_closed_form.py

Three problems: the poster's balanced square-loss UFM, the same with label smoothing a = 0.1 (its
closed form is docs/theory.md §5), and imbalanced counts (8, 4, 2) with a regularized bias, which
have no closed form: the comparison then says why, and the flow still runs. Every row has the keys of
``ufm.experiments.compare.ROW_KEYS``; the integrator and its tolerances are the library's defaults.
"""

from ufm.experiments.compare import compare_flow
from ufm.model import UFMProblem

PROBLEMS = {
    "balanced": UFMProblem(4, 5, 0.02, 0.02),
    "label smoothing 0.1": UFMProblem(4, 5, 0.02, 0.02, label_smoothing=0.1),
    "counts (8, 4, 2), lam_b = 1": UFMProblem(3, (8, 4, 2), 0.02, 0.02, lam_b=1.0),
}

for name, problem in PROBLEMS.items():
    row = compare_flow(problem, 5, seed=0).row()
    print(f"{name}: {row['method']}, {row['nfev']} gradients, {row['message']}")
    if row["closed_form_note"] is not None:
        print(f"  loss {row['loss']:.10g}; no closed form: {row['closed_form_note']}")
        continue
    print(f"  loss {row['loss']:.10g} (closed form {row['cf_loss']:.10g}), eps {row['eps']:.10g} "
          f"(closed form {row['cf_eps']:.10g}), reached: {row['reached']}")  # fmt: skip
