"""Figures. Each function states the claim it supports, takes computed results, saves a file and
returns its path; none calls ``plt.show()`` or touches pyplot, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["plot_flow_measures", "plot_flows", "plot_nc_training", "plot_phase_diagram"]

DPI = 120  # enough for a report page, small enough to commit


def _figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """A figure and its axes, made without pyplot: no backend is chosen and no global state touched,
    so plotting works headless and leaves a user's interactive session alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# Panels of plot_nc_training: (history column, title). Train error first, then the poster's NC1-NC4.
_NC_PANELS = (
    ("train_err", "training error"),
    ("nc1", r"NC1: Tr($\Sigma_W\Sigma_B^+$)/C"),
    ("nc2_equinorm", "NC2 equinorm (CV of class-mean norms)"),
    ("nc2_equiangle", "NC2 equiangle (std of cosines)"),
    ("nc3", r"NC3: $\|W^T/\|W\| - M/\|M\|\|^2$"),
    ("nc4", "NC4: disagreement with nearest class mean"),
)


def plot_nc_training(histories: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> Path:
    """Claim (poster, Figs. 1-2): neural collapse appears with weight decay and not without it.

    Plots training error and NC1-NC4 against epoch, one line per run, on log scales (zeros, as a
    training error of exactly 0, are drawn at the bottom edge).

    Parameters
    ----------
    histories : mapping of label -> history
        A history maps column names (``epoch``, ``train_err``, ``nc1``, ``nc2_equinorm``,
        ``nc2_equiangle``, ``nc3``, ``nc4``) to arrays of shape (n_measured,), as
        :attr:`ufm.training.TrainResult.history`.
    path : str or Path
        Output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).

    Returns
    -------
    Path of the saved figure.
    """

    if not histories:
        raise ValueError("no histories to plot")
    for label, history in histories.items():
        missing = [k for k, _ in _NC_PANELS if k not in history] + ([] if "epoch" in history else ["epoch"])
        if missing:
            raise ValueError(f"history {label!r} lacks columns {missing}")
    fig, axes = _figure(2, 3, (13, 7))
    for ax, (key, title) in zip(axes.flat, _NC_PANELS):
        floor = np.inf
        for history in histories.values():
            y = np.asarray(history[key], dtype=float)
            positive = y[np.isfinite(y) & (y > 0)]
            floor = min(floor, positive.min() if positive.size else np.inf)
        # Zeros cannot sit on a log axis: draw them a decade below the smallest positive value.
        floor = 1e-4 if not np.isfinite(floor) else floor / 10
        for label, history in histories.items():
            y = np.asarray(history[key], dtype=float)
            ax.plot(history["epoch"], np.where(y > 0, y, floor), label=label)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    return _save(fig, path)


def plot_flow_measures(t, metrics, path: str | Path, *, eps_closed_form: float | None = None) -> Path:
    """Claim (docs/theory.md §5): along gradient flow the NC measures vanish and eps settles at the closed form.

    |NC1|, |NC2|, |NC3| and eps of one flow against t on log axes (t = 0 drawn at the first t > 0),
    with the closed form's eps dashed.

    Parameters
    ----------
    t : (k,) times; metrics : name -> (k,) measures, as ``FlowResult.metrics``; path : output file;
    eps_closed_form : the closed form's eps, or None (e.g. cross-entropy, which has none).
    """
    t = np.asarray(t, dtype=float)
    t = np.maximum(t, t[t > 0].min() if (t > 0).any() else 1.0)
    fig, ax = _figure(1, 1, (7, 4.5))
    for k in ("nc1", "nc2_equinorm", "nc2_maxangle_w", "nc3", "eps"):
        if k in metrics and np.isfinite(metrics[k]).any():
            (line,) = ax.plot(t, np.abs(metrics[k]), label=k)
            if k == "eps" and eps_closed_form:
                ax.axhline(eps_closed_form, ls="--", color=line.get_color(), label="eps (closed form)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="t (flow time)",
        title="gradient flow of the UFM: NC measures and eps",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flows(trajectories, summary, path: str | Path) -> Path:
    """Claim (docs/theory.md §5): gradient flow from a random start reaches the closed-form global minimizer.

    Three panels against t: eps (dashed lines: the closed form's eps), the gap L(t) - L* to the
    closed-form minimal loss, and NC1. One line per run.

    Parameters
    ----------
    trajectories : rows with ``run``, ``t``, ``loss``, ``eps``, ``nc1`` (as ``flow_trajectories.csv``).
    summary : rows with ``delta``, ``bias``, ``eps_theory``, ``loss_theory`` (as ``flows.csv``), in the
        order in which the runs appear in ``trajectories``.
    path : output file.
    """
    runs = list(dict.fromkeys(r["run"] for r in trajectories))
    if len(runs) != len(summary):
        raise ValueError(f"{len(runs)} trajectories but {len(summary)} summary rows")
    fig, axes = _figure(1, 3, (15, 4.5))
    for k, (run, row) in enumerate(zip(runs, summary)):
        rows = [r for r in trajectories if r["run"] == run]
        t = _column(rows, "t")
        keep = t > 0  # log time axis
        color = f"C{k}"
        axes[0].plot(t[keep], _column(rows, "eps")[keep], color=color, label=run)
        axes[0].axhline(row["eps_theory"], color=color, ls="--", lw=0.8)
        gap = _column(rows, "loss") - row["loss_theory"]
        axes[1].plot(t[keep], np.maximum(gap[keep], 1e-16), color=color)
        axes[2].plot(t[keep], _column(rows, "nc1")[keep], color=color)
    titles = ["eps = 1 - correct output (dashed: closed form)", "L(t) - L* (closed form)", "NC1"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("t")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_phase_diagram(rows, path: str | Path) -> Path:
    """Claim (docs/theory.md §5, derived threshold): the UFM collapses iff lam < lam* = 1/(C sqrt(N)).

    eps (left) and the squared classifier-row norm ||W_c||^2 (right) against lam/lam*: the closed
    form (line, from ``ufm_optimum``) and the end points of gradient flow (markers). Past lam* the
    minimizer is zero: eps = 1 - 1/C and ||W_c|| = 0.

    Parameters
    ----------
    rows : rows with ``C``, ``N``, ``bias``, ``lam_over_lam_star``, ``eps_flow``,
        ``w_row_norm_sq_flow`` (as ``phase.csv``).
    path : output file.
    """
    from ..closed_form import ufm_optimum

    if not rows:
        raise ValueError("no rows to plot")
    C, N, bias = rows[0]["C"], rows[0]["N"], rows[0]["bias"]
    lam_star = 1.0 / (C * np.sqrt(N))
    x = _column(rows, "lam_over_lam_star")
    grid = np.linspace(1e-3, max(x.max(), 1.2), 400)
    theory = [ufm_optimum(C, N, g * lam_star, g * lam_star, bias=bias) for g in grid]
    fig, axes = _figure(1, 2, (11, 4.2))
    for ax, key, label in [(axes[0], "eps", "eps"), (axes[1], "w_row_norm_sq", r"$\|W_c\|^2$")]:
        ax.plot(grid, [getattr(o, key) for o in theory], "k-", label="closed form")
        ax.plot(x, _column(rows, f"{key}_flow"), "o", color="C1", label="gradient flow")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set(xlabel="lam / lam*", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"collapse threshold, C={C}, N={N}, {'bias' if bias else 'no bias'}", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Figures from sweep tables (ufm.experiments.sweep): one row per run.


def _sweep_rows(table) -> list[dict]:
    """Rows of a sweep table given as a path (.csv/.parquet) or already as a list of dicts."""
    from ..tables import read_table

    rows = read_table(table) if isinstance(table, str | Path) else list(table)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    if not ok:
        raise ValueError("the sweep table has no finished ('ok') runs to plot")
    return ok


def _groups(rows: list[dict], hue: str | None) -> dict[str, list[dict]]:
    if hue is not None and any(hue not in r for r in rows):
        raise ValueError(f"the table has no column {hue!r} to colour by")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault("all" if hue is None else f"{hue}={r[hue]}", []).append(r)
    return groups


def _column(rows: list[dict], name: str) -> np.ndarray:
    """Column ``name`` as floats; an empty cell (undefined measure) is NaN and is not drawn."""
    if any(name not in r for r in rows):
        raise ValueError(f"the table has no column {name!r}")
    return np.array([np.nan if r[name] is None else float(r[name]) for r in rows])


def plot_theory_vs_measurement(
    table, path: str | Path, *, measured: str = "eps", predicted: str = "cf_eps", hue: str | None = "bias"
) -> Path:
    """Claim (docs/theory.md §5): gradient flow from random starts ends at the closed-form minimizer.

    Scatter of a measured column against its prediction, one point per finished run, with the identity
    line: every point on it means theory and measurement agree (e.g. eps of the flow's end point against
    ``ufm_optimum``'s eps, across lambdas on both sides of the collapse threshold).

    Parameters
    ----------
    table : path of a sweep table (.csv/.parquet) or its rows (list of dicts), as :func:`ufm.tables.read_table`.
    path : output file (format from the suffix).
    measured, predicted : column names (default ``eps`` and ``cf_eps`` of a flow sweep).
    hue : column whose values get their own colour (None: one colour).

    Returns
    -------
    Path of the saved figure.
    """

    rows = _sweep_rows(table)
    fig, ax = _figure(1, 1, (5, 5))
    lo, hi = np.inf, -np.inf
    for label, group in _groups(rows, hue).items():
        x, y = _column(group, predicted), _column(group, measured)
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.any():
            lo, hi = min(lo, x[keep].min(), y[keep].min()), max(hi, x[keep].max(), y[keep].max())
        ax.scatter(x[keep], y[keep], s=25, alpha=0.8, label=label)
    if not np.isfinite(lo):
        raise ValueError(f"no run has both {measured!r} and {predicted!r}")
    pad = 0.05 * (hi - lo) or 0.05
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="measured = predicted")
    err = max(
        abs(r[measured] - r[predicted]) for r in rows if r[measured] is not None and r[predicted] is not None
    )
    ax.set(xlabel=f"{predicted} (theory)", ylabel=f"{measured} (measured)",
           title=f"{measured}: theory vs measurement, {len(rows)} runs, max |gap| {err:.2g}")  # fmt: skip
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(
    table,
    path: str | Path,
    *,
    x: str = "lam_w",
    y: str = "eps",
    theory: str | None = "cf_eps",
    hue: str | None = "bias",
    logx: bool = True,
) -> Path:
    """Claim: the measured ``y`` follows the closed form across the swept ``x`` (e.g. a phase diagram).

    Measured values are markers (mean over runs with the same x, error bars from their spread, e.g.
    over seeds); the theory column, where given, is a line. With the defaults it shows eps of the flow
    against lambda_W across the collapse threshold, with and without a bias.

    Parameters
    ----------
    table : path of a sweep table or its rows, as :func:`plot_theory_vs_measurement`.
    path : output file.
    x, y : columns on the axes; theory : column of the prediction of y (None: none drawn).
    hue : column whose values get their own colour; logx : logarithmic x axis.

    Returns
    -------
    Path of the saved figure.
    """

    rows = _sweep_rows(table)
    fig, ax = _figure(1, 1, (6, 4.5))
    for label, group in _groups(rows, hue).items():
        xs, ys = _column(group, x), _column(group, y)
        ux = np.unique(xs[np.isfinite(xs)])
        mean = np.array([np.nanmean(ys[xs == v]) if np.isfinite(ys[xs == v]).any() else np.nan for v in ux])
        spread = np.array([np.nanstd(ys[xs == v]) if np.isfinite(ys[xs == v]).any() else np.nan for v in ux])
        line = ax.errorbar(ux, mean, yerr=spread, fmt="o", ms=5, capsize=3, label=f"{label} measured")
        if theory is not None:
            th = _column(group, theory)
            ax.plot(ux, [np.nanmean(th[xs == v]) if np.isfinite(th[xs == v]).any() else np.nan for v in ux],
                    "-", color=line[0].get_color(), lw=1.2, label=f"{label} theory ({theory})")  # fmt: skip
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}, {len(rows)} runs")
    ax.legend(fontsize=8)
    return _save(fig, path)


__all__ += ["plot_sweep", "plot_theory_vs_measurement"]
