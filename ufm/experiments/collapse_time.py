"""Time to collapse against lambda, C, N and p, from random starts (docs/theory.md §11): a part of
``ufm reproduce``.

Claim: the last thing gradient flow of the UFM does is shed the within-class scatter that the
classifier does not see. By §11 each deviation obeys d_i' = -K d_i with K = A^T A/n + lam_h I, so
outside the row space of A (dimension p - rank A, at least p - C) the scatter decays exactly as
e^{-2 lam_h t}, and its share lam_h/2 tr S of the loss with it. The loss is within a relative
``LOSS_RTOL`` of the closed form L* once that share is, which predicts the slow mode's time

    T_pred = ln( lam_h tr(S_0) (p - C + 1)/p / (2 LOSS_RTOL L*) ) / (2 lam_h),

tr(S_0) ~ (n - C) for the random start (the share of the scatter outside a (C-1)-dimensional row
space is (p - C + 1)/p on average). So T ~ 1/lam up to a logarithm, and C, N and p enter only
through the logarithm. The flows run on the moments (§11), so N up to 10^4 costs nothing extra.

Measured: the first recorded time T at which the loss is within LOSS_RTOL of the closed form and
NC1 < NC1_MAX, and it stays so to the end; the fitted exponents are the least-squares slopes of
log T (and of log T_pred) against the log of each swept parameter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..dynamics import gradient_flow
from ..dynamics.moments import random_moments
from ..model import UFMProblem
from ..tables import read_csv, write_csv

__all__ = [
    "LOSS_RTOL", "NC1_MAX", "collapse_time_section", "plot_collapse_time", "predicted_time", "run_collapse_time",
]  # fmt: skip

LOSS_RTOL = 1e-6  # the loss within this, relative, of the closed form
NC1_MAX = 1e-3  # and NC1 below this
# Base point of each sweep and the values swept (one parameter at a time), lam_w = lam_h = lam.
GRIDS = {
    "quick": dict(base=dict(C=4, N=10, p=8, lam=3e-3), lam=(3e-2, 1e-2, 3e-3), C=(3, 4, 6), N=(10, 100, 1000),
                  p=(8, 16, 32)),
    "full": dict(base=dict(C=4, N=10, p=16, lam=3e-3), lam=(1e-2, 3e-3, 1e-3, 3e-4), C=(3, 4, 6, 10),
                 N=(10, 100, 1000, 10000), p=(8, 16, 32, 64)),
}  # fmt: skip
N_RECORDS = 300  # log-spaced records: T is resolved to about 5% (6 decades / 300)
T_MAX_LAM = 40.0  # at most t = 40/lam: e^{-80} is far below any share of the loss measured here
RTOL = 1e-3  # ETD2's path tolerance: the collapse time to ~1e-3, below the records' 5%


def predicted_time(lam: float, trace_s0: float, C: int, p: int, loss_min: float) -> float:
    """T_pred of the module docstring: the time at which the scatter outside A's row space, decaying
    as e^{-2 lam t}, holds a share LOSS_RTOL of the minimal loss."""
    share = lam * trace_s0 * (p - C + 1) / p / 2
    return float(np.log(share / (LOSS_RTOL * loss_min)) / (2 * lam))


def _collapse_time(t: np.ndarray, loss: np.ndarray, nc1: np.ndarray, loss_min: float) -> float | None:
    """First recorded time from which on the loss is within LOSS_RTOL of loss_min and NC1 < NC1_MAX."""
    ok = (loss - loss_min <= LOSS_RTOL * loss_min) & (nc1 < NC1_MAX)
    if not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return float(t[bad[-1] + 1] if bad.size else t[0])


def _one(C: int, N: int, p: int, lam: float, seed: int) -> dict:
    problem = UFMProblem(C, N, lam, lam)
    opt = problem.loss.closed_form(problem)
    start = random_moments(problem, p, rng=seed)
    t_max = T_MAX_LAM / lam
    t_eval = np.concatenate([[0.0], np.geomspace(1e-2, t_max, N_RECORDS)])
    # Stopped a decade of the loss past the threshold; ETD2 at RTOL, the time's accuracy (records 5%).
    r = gradient_flow(problem, start, method="ETD2", rtol=RTOL, atol=RTOL * 1e-2, t_max=t_max, tol=0.0, t_eval=t_eval,
                      target_loss=opt.loss * (1 + LOSS_RTOL / 10))  # fmt: skip
    T = _collapse_time(r.t, r.loss, r.metrics["nc1"], opt.loss)
    return {
        "C": C, "N": N, "p": p, "lam": lam, "delta": opt.delta, "T_collapse": T,
        "T_pred": predicted_time(lam, float(np.trace(start.S)), C, p, opt.loss),
        "nfev": r.nfev, "method": r.method, "loss_rel_err": float((r.loss[-1] - opt.loss) / opt.loss),
    }  # fmt: skip


def _slope(x: list[float], y: list[float | None]) -> float | None:
    pts = [(np.log(a), np.log(b)) for a, b in zip(x, y) if b is not None and b > 0]
    if len(pts) < 2:
        return None
    X, Y = np.array(pts).T
    return float(np.polyfit(X, Y, 1)[0])


def run_collapse_time(
    out: Path, *, quick: bool, seed: int = 0, progress: bool = True
) -> tuple[Path, Path, Path]:
    """Sweep lam, C, N, p one at a time; write collapse_time.csv, collapse_exponents.csv and
    collapse_time.png. Returns their paths."""
    from tqdm import tqdm

    grid = GRIDS["quick" if quick else "full"]
    jobs = [(name, {**grid["base"], name: v}) for name in ("lam", "C", "N", "p") for v in grid[name]]
    rows = []
    for i, (name, kw) in enumerate(tqdm(jobs, desc="collapse time", disable=not progress)):
        rows.append({"swept": name, **_one(kw["C"], kw["N"], kw["p"], kw["lam"], seed + 200 + i)})
    table = write_csv(out / "collapse_time.csv", rows)
    exponents = []
    for name in ("lam", "C", "N", "p"):
        sub = [r for r in rows if r["swept"] == name]
        x = [float(r[name]) for r in sub]
        exponents.append({
            "parameter": name, "exponent_measured": _slope(x, [r["T_collapse"] for r in sub]),
            "exponent_predicted": _slope(x, [r["T_pred"] for r in sub]),
        })  # fmt: skip
    exp_path = write_csv(out / "collapse_exponents.csv", exponents)
    figure = plot_collapse_time(read_csv(table), out / "collapse_time.png")
    return table, exp_path, figure


def plot_collapse_time(rows: list[dict], path: str | Path) -> Path:
    """Claim (docs/theory.md §11): the time to collapse follows the slow mode, T ~ ln(...)/(2 lam):
    measured T (markers) and T_pred (dashed) against each swept parameter, log-log.

    Parameters
    ----------
    rows : rows of collapse_time.csv (``swept``, the parameter, ``T_collapse``, ``T_pred``).
    path : output file.
    """
    from .plots import _figure, _save

    fig, axes = _figure(1, 4, (14, 3.6))
    for ax, name in zip(axes, ("lam", "C", "N", "p")):
        sub = [r for r in rows if r["swept"] == name]
        x = np.array([float(r[name]) for r in sub])
        measured = np.array(
            [np.nan if r["T_collapse"] in (None, "") else float(r["T_collapse"]) for r in sub]
        )
        ax.plot(x, measured, "o-", color="C0", label="flow (moments)")
        ax.plot(x, [float(r["T_pred"]) for r in sub], "k--", label="slow mode: T_pred")
        ax.set(xscale="log", yscale="log", xlabel=name, ylabel="time to collapse")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"time to collapse: loss within {LOSS_RTOL:g} of the closed form and NC1 < {NC1_MAX:g}", fontsize=10
    )
    return _save(fig, path)


def collapse_time_section(out: Path) -> str:
    """The report's section, from collapse_time.csv and collapse_exponents.csv alone."""
    rows = read_csv(out / "collapse_time.csv")
    exps = read_csv(out / "collapse_exponents.csv")

    def fmt(v) -> str:
        return "-" if v is None or v == "" else f"{v:.3g}" if isinstance(v, float) else str(v)

    cols = ("swept", "C", "N", "p", "lam", "delta", "T_collapse", "T_pred", "nfev")
    table = "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    )
    fits = "\n".join(
        f"- {e['parameter']}: measured {fmt(e['exponent_measured'])}, predicted {fmt(e['exponent_predicted'])}"
        for e in exps
    )
    return f"""## 6. Time to collapse (`collapse_time.csv`, `collapse_exponents.csv`, figure `collapse_time.png`)

Moment flows (docs/theory.md §11) from random starts, lam_w = lam_h = lam, one parameter swept at a
time. T: the first recorded time from which the loss is within {LOSS_RTOL:g} (relative) of the closed
form and NC1 < {NC1_MAX:g}. T_pred: the slow mode's prediction, the within-class scatter outside the
classifier's row space decaying as exp(-2 lam t) (`ufm.experiments.collapse_time`).

{table}

Fitted exponents of T (slopes of log T against the log of each parameter):

{fits}

![collapse time](collapse_time.png)
"""
