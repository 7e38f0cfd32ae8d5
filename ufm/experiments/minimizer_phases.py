"""Part of ``ufm reproduce``: phase diagrams of the literature's minimizers, closed form against the end
points of gradient flow from random starts (docs/theory.md §6-§8).

Three diagrams, one table ``minimizer_phases.csv`` (column ``diagram`` says which) and one figure:

1. ``lam_b``: the regularized bias (§6). C = 3, N = 2, lam_w = lam_h = lam fixed; lam_b swept across
   the boundary delta = lam_b/(1 + lam_b), where the bias stops carrying the whole mean output.
2. ``depth``: the collapse threshold at depth L = 1, 2, 3 (§7). C = 3, N = 2, a bias, every decay
   equal to lam; lam swept as a multiple of each depth's threshold (zero wins from ratio 1 on).
3. ``minority``: minority collapse (§8). Counts (6, 3, 1), no bias, depth 1; class c is sent to zero
   once lam >= sqrt(N_c)/n.

Each row holds the closed form's loss and the flow's end loss, and the diagram's own quantity (the
bias entry, the number of kept modes, the per-class ||W_c||^2) from both. A flow that ends above the
closed form (a local minimum of a deep model, or a saddle) is kept and marked ``reached = False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..closed_form import ufm_zero_loss
from ..closed_form_deep import deep_threshold_decay
from ..model import UFMProblem, loss
from ..tables import read_csv, write_csv
from .compare import compare_flow

C_SMALL, N_SMALL = 3, 2
LAM_BIAS = 0.05  # delta = 3 sqrt(2) 0.05 = 0.21: the boundary lam_b/(1 + lam_b) = delta at lam_b = 0.27
LAM_B = {"quick": (0.1, 0.5, 3.0), "full": (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0, 10.0)}
DEPTHS = (1, 2, 3)
DEPTH_RATIOS = {"quick": (0.6, 1.4), "full": (0.3, 0.6, 0.8, 0.95, 1.05, 1.2, 1.4)}
COUNTS = (6, 3, 1)
MINORITY_LAMS = {
    "quick": (0.05, 0.13, 0.22),
    "full": (0.02, 0.05, 0.08, 0.11, 0.13, 0.16, 0.2, 0.22, 0.25, 0.3),
}
FLOW_TOL, FLOW_T_MAX = 1e-8, 1e6
# Agreement of the flow's end loss with the closed form that counts as reached.
REACHED_RTOL = 1e-6


def _depth_threshold_lam(depth: int) -> float:
    """The equal decay lam at which zero starts to win at this depth (c = lam): S = sqrt(N), n = C N."""
    n, S = C_SMALL * N_SMALL, np.sqrt(N_SMALL)
    return float(deep_threshold_decay(S, depth + 1)) / n


def _row(diagram: str, x: float, problem: UFMProblem, seed: int) -> dict:
    opt = problem.loss.closed_form(problem)
    comparison = compare_flow(problem, problem.C + 1, seed=seed, t_max=FLOW_T_MAX, tol=FLOW_TOL)
    end = comparison.flow.params
    end_loss = loss(problem, end)
    row = {
        "diagram": diagram, "x": x, "depth": problem.depth, "regime": opt.regime, "geometry": opt.geometry,
        "loss_theory": opt.loss, "loss_flow": end_loss,
        "reached": abs(end_loss - opt.loss) <= REACHED_RTOL * max(abs(opt.loss), 1e-12),
        "grad_norm": float(comparison.flow.grad_norm),
    }  # fmt: skip
    if diagram == "lam_b":
        row |= {"b_theory": opt.b[0], "b_flow": float(np.mean(end.b)), "cos_w_theory": opt.cos_w}
        row["cos_w_flow"] = comparison.row()["cos_w"]
    elif diagram == "depth":
        sv = np.linalg.svd(end.W @ end.H if problem.depth == 1 else _product(end), compute_uv=False)
        row |= {"rank_theory": opt.rank, "rank_flow": int(np.sum(sv > 1e-6 * max(sv.max(), 1e-300)))}
    else:
        w_flow = (end.W**2).sum(axis=1)
        for c in range(problem.C):
            row[f"w_row_norm_sq_{c}_theory"] = opt.w_row_norm_sq[c]
            row[f"w_row_norm_sq_{c}_flow"] = float(w_flow[c])
    return row


def _product(params) -> np.ndarray:
    z = params.H
    for W in params.Ws:
        z = W @ z
    return z


def run_minimizer_phases(
    out: Path, *, quick: bool, seed: int = 0, progress: bool = True
) -> tuple[Path, Path]:
    """The three diagrams of the module docstring; returns (CSV, figure)."""
    from tqdm import tqdm

    mode = "quick" if quick else "full"
    cases = [("lam_b", lb, UFMProblem(C_SMALL, N_SMALL, LAM_BIAS, LAM_BIAS, lam_b=lb)) for lb in LAM_B[mode]]
    for depth in DEPTHS:
        lam_t = _depth_threshold_lam(depth)
        for r in DEPTH_RATIOS[mode]:
            cases.append(("depth", r, UFMProblem(C_SMALL, N_SMALL, r * lam_t, r * lam_t, depth=depth)))
    cases += [("minority", lam, UFMProblem(3, COUNTS, lam, lam, bias=False)) for lam in MINORITY_LAMS[mode]]
    rows = [
        _row(diagram, float(x), problem, seed + i)
        for i, (diagram, x, problem) in enumerate(tqdm(cases, desc="minimizer phases", disable=not progress))
    ]
    path = write_csv(out / "minimizer_phases.csv", rows)
    return path, plot_minimizer_phases(read_csv(path), out / "minimizer_phases.png")


def plot_minimizer_phases(rows: list[dict], path: Path) -> Path:
    """Three panels: the bias entry against lam_b, loss/zero-loss against lam/lam_t for L = 1, 2, 3, and
    ||W_c||^2 per class against lam; closed form as lines (dense grid), flow end points as markers."""
    from .plots import _figure, _save

    fig, axes = _figure(1, 3, (15, 4.2))
    grid = np.geomspace(0.03, 12, 200)
    theory = [UFMProblem(C_SMALL, N_SMALL, LAM_BIAS, LAM_BIAS, lam_b=g) for g in grid]
    axes[0].plot(grid, [p.loss.closed_form(p).b[0] for p in theory], "k-", label="closed form b")
    pts = [r for r in rows if r["diagram"] == "lam_b"]
    axes[0].plot([r["x"] for r in pts], [r["b_flow"] for r in pts], "o", color="C1", label="flow b")
    delta = C_SMALL * np.sqrt(N_SMALL) * LAM_BIAS
    axes[0].axvline(delta / (1 - delta), color="grey", ls=":", lw=1)
    axes[0].set(xscale="log", xlabel="lam_b", ylabel="bias entry", title="§6 regularized bias")
    ratios = np.linspace(0.05, 1.6, 200)
    zero = float(ufm_zero_loss(C_SMALL))  # W = H = 0, b = 1/C at every depth
    for depth in DEPTHS:
        lam_t = _depth_threshold_lam(depth)
        probs = [UFMProblem(C_SMALL, N_SMALL, r * lam_t, r * lam_t, depth=depth) for r in ratios]
        opts = [p.loss.closed_form(p) for p in probs]
        axes[1].plot(ratios, [o.loss / zero for o in opts], "-", color=f"C{depth}", label=f"L={depth}")
        pts = [r for r in rows if r["diagram"] == "depth" and r["depth"] == depth]
        axes[1].plot([r["x"] for r in pts], [r["loss_flow"] / zero for r in pts], "o", color=f"C{depth}")
    axes[1].axvline(1.0, color="grey", ls=":", lw=1)
    axes[1].set(xlabel="lam / lam_threshold(L)", ylabel="loss / zero loss", title="§7 depth thresholds")
    lams = np.linspace(0.005, 0.32, 200)
    opts = [UFMProblem(3, COUNTS, g, g, bias=False) for g in lams]
    opts = [p.loss.closed_form(p) for p in opts]
    pts = [r for r in rows if r["diagram"] == "minority"]
    for c in range(3):
        axes[2].plot(lams, [o.w_row_norm_sq[c] for o in opts], "-", color=f"C{c}", label=f"N_c={COUNTS[c]}")
        axes[2].plot([r["x"] for r in pts], [r[f"w_row_norm_sq_{c}_flow"] for r in pts], "o", color=f"C{c}")
    axes[2].set(xlabel="lam", ylabel=r"$\|W_c\|^2$", title=f"§8 minority collapse, counts {COUNTS}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
