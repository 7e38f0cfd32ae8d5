"""The low-rank bias of the journal paper [XRLGP23] measured: the singular values of every layer over
the epochs, with and without weight decay (docs/theory.md §16.1); a part of ``ufm reproduce``.

Claim: SGD with weight decay drives the weight matrices towards low rank, and under neural collapse
the classifier W_L (C, p) has rank at most C - 1 (its rows W_L^c ~ mu_c - mu_G sum to zero).

No network is trained here: the weight-decay experiment (part 4, :mod:`ufm.experiments.weight_decay`)
already trains the same network with lambda = 0, lambda_0 and 2 lambda_0, and every run writes the
singular values of W_1, ..., W_L at every epoch with singular-value measures to its
``singular_values.csv`` (:data:`ufm.training.SINGULAR_VALUES`). From those files this module tabulates,
per run, epoch and layer, with s_1 >= s_2 >= ... >= s_r (r = min of the layer's dimensions):

* the numerical rank: the number of s_i > RANK_RTOL s_1 (:data:`ufm.training.RANK_RTOL`, the
  threshold of the history's ``rank_W{k}``);
* the stable rank sum_i s_i^2 / s_1^2 = ||W||_F^2 / ||W||_2^2 (1 <= stable rank <= rank);
* the effective rank of Roy and Vetterli [RV07], exp(-sum_i p_i ln p_i) with p_i = s_i / sum_j s_j
  (1 <= effective rank <= r; equal to k for k equal nonzero singular values);
* s_r / s_1 (for W_L, s_C/s_1: zero at the NC rank C - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tables import read_csv, write_csv

__all__ = [
    "LOW_RANK_CSV",
    "LowRankResult",
    "effective_rank",
    "low_rank_section",
    "plot_low_rank",
    "run_low_rank",
    "spectrum_measures",
    "stable_rank",
]

LOW_RANK_CSV = "low_rank.csv"
LOW_RANK_PNG = "low_rank.png"


def _check_spectrum(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=float)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)) or np.any(s < 0) or not np.any(s > 0):
        raise ValueError(
            "singular values must be a non-empty 1-d array of finite values >= 0, not all zero; got "
            f"shape {s.shape}"
        )
    return s


def stable_rank(s: np.ndarray) -> float:
    """Stable rank sum_i s_i^2 / max_i s_i^2 = ||W||_F^2 / ||W||_2^2 of singular values s (r,)."""
    s = _check_spectrum(s)
    return float(np.sum(s**2) / np.max(s) ** 2)


def effective_rank(s: np.ndarray) -> float:
    """Effective rank of Roy and Vetterli [RV07]: exp of the Shannon entropy of p = s / sum(s).

    Parameters
    ----------
    s : ndarray, shape (r,)
        Singular values (any order), >= 0, not all zero. Zeros contribute 0 ln 0 = 0.

    Returns
    -------
    float in [1, r]: 1 for one nonzero value, k for k equal nonzero values.
    """
    s = _check_spectrum(s)
    p = s[s > 0] / np.sum(s)
    return float(np.exp(-np.sum(p * np.log(p))))


def spectrum_measures(s: np.ndarray, rank_rtol: float) -> dict[str, float]:
    """The module docstring's measures of one layer's singular values s (r,), descending."""
    s = _check_spectrum(s)
    return {
        "n_sv": int(s.size),
        "rank": int(np.sum(s > rank_rtol * s[0])),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "s_1": float(s[0]),
        "s_min_over_s_1": float(s[-1] / s[0]),
    }


@dataclass(frozen=True)
class LowRankResult:
    """Outcome of :func:`run_low_rank`.

    Attributes
    ----------
    table : Path
        ``low_rank.csv``: one row per (run, epoch, refined, layer) with the measures of
        :func:`spectrum_measures` and the run's ``wd``.
    figure : Path
        ``low_rank.png`` (:func:`plot_low_rank`).
    final_rank_WL : tuple of (float, int, int)
        Per run, (lambda, numerical rank of W_L at the last SGD epoch, C).
    """

    table: Path
    figure: Path
    final_rank_WL: tuple[tuple[float, int, int], ...]


def _rows_of_run(wd: float, path: Path, rank_rtol: float) -> list[dict]:
    """``low_rank.csv`` rows of one run's ``singular_values.csv`` (SGD epochs, then refined ones)."""
    lines = path.read_text().splitlines()[1:]
    if not lines:
        return []
    table = np.loadtxt(lines, delimiter=",", ndmin=2)  # (rows, 5): epoch, refined, layer, index, value
    epoch, refined, layer, index, _ = table.T
    order = np.lexsort((index, layer, epoch, refined))
    table = table[order]
    keys = table[:, :3]
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    rows = []
    for a, b in zip(starts, np.r_[starts[1:], len(table)]):
        e, r, k = (int(v) for v in table[a, :3])
        rows.append(
            {"wd": wd, "epoch": e, "refined": r, "layer": k, **spectrum_measures(table[a:b, 4], rank_rtol)}
        )
    return rows


def run_low_rank(runs: Sequence[tuple[float, Path]], out: Path) -> LowRankResult:
    """Tabulate and draw the ranks of every layer over the epochs of already trained runs.

    Parameters
    ----------
    runs : sequence of (lambda, run directory)
        Each directory holds the ``singular_values.csv`` that :func:`ufm.training.train` writes
        (the weight-decay experiment's ``wd_<lambda>`` directories).
    out : Path
        Directory for ``low_rank.csv`` and ``low_rank.png``.
    """
    from ..training import RANK_RTOL, SINGULAR_VALUES

    if not runs:
        raise ValueError("runs is empty: give at least one (lambda, run directory)")
    rows = []
    for wd, directory in runs:
        path = Path(directory) / SINGULAR_VALUES
        if not path.is_file():
            raise ValueError(f"{path} is missing: the run in {directory} recorded no singular values")
        rows += _rows_of_run(float(wd), path, RANK_RTOL)
    if not rows:
        raise ValueError(
            "no run recorded singular values (their singular_values.csv files hold only a header)"
        )
    table = write_csv(Path(out) / LOW_RANK_CSV, rows)
    rows = read_csv(table)
    figure = plot_low_rank(rows, Path(out) / LOW_RANK_PNG)
    return LowRankResult(
        table=table,
        figure=figure,
        final_rank_WL=tuple((r["wd"], r["rank"], r["n_sv"]) for r in _last_epoch(rows, last_layer=True)),
    )


def _last_epoch(rows: list[dict], *, refined: int = 0, last_layer: bool = False) -> list[dict]:
    """The rows of each run's last recorded epoch (SGD's end, or the refined point), by wd then layer."""
    out = []
    for wd in dict.fromkeys(r["wd"] for r in rows):
        sub = [r for r in rows if r["wd"] == wd and r["refined"] == refined]
        if not sub:
            continue
        last = max(r["epoch"] for r in sub)
        layers = [r for r in sub if r["epoch"] == last]
        out += (
            [max(layers, key=lambda r: r["layer"])]
            if last_layer
            else sorted(layers, key=lambda r: r["layer"])
        )
    return out


def plot_low_rank(rows: list[dict], path: str | Path) -> Path:
    """Claim [XRLGP23]: weight decay drives the layers towards low rank, rank W_L <= C - 1 under NC.

    Top row, one panel per run: the singular values of W_L against epoch (log scale), with the
    rank threshold RANK_RTOL s_1 dashed. Bottom row: the effective rank (solid) and the stable rank
    (dashed) of every layer against epoch.

    Parameters
    ----------
    rows : rows of ``low_rank.csv`` (SGD epochs are drawn; refined rows are not).
    path : output file.
    """
    from ..training import RANK_RTOL
    from .plots import _figure, _save

    wds = list(dict.fromkeys(r["wd"] for r in rows))
    fig, axes = _figure(2, len(wds), (4.2 * len(wds), 6.5))
    axes = np.asarray(axes).reshape(2, len(wds))
    for j, wd in enumerate(wds):
        sub = [r for r in rows if r["wd"] == wd and r["refined"] == 0]
        n_layers = max(r["layer"] for r in sub)
        last = sorted((r for r in sub if r["layer"] == n_layers), key=lambda r: r["epoch"])
        epochs = [r["epoch"] for r in last]
        axes[0, j].plot(epochs, [r["s_1"] for r in last], "k-", lw=1.5, label="$s_1$")
        axes[0, j].plot(epochs, [r["s_1"] * r["s_min_over_s_1"] for r in last], "C3-", label="$s_C$")
        axes[0, j].plot(epochs, [RANK_RTOL * r["s_1"] for r in last], "k--", lw=0.8, label="RANK_RTOL $s_1$")
        axes[0, j].set(yscale="log", xlabel="epoch", title=f"W_L, lambda = {wd:g}")
        for k in range(1, n_layers + 1):
            layer = sorted((r for r in sub if r["layer"] == k), key=lambda r: r["epoch"])
            x = [r["epoch"] for r in layer]
            axes[1, j].plot(
                x, [r["effective_rank"] for r in layer], "-", color=f"C{k - 1}", label=f"W_{k} eff."
            )
            axes[1, j].plot(
                x, [r["stable_rank"] for r in layer], "--", color=f"C{k - 1}", label=f"W_{k} stable"
            )
        axes[1, j].set(yscale="log", xlabel="epoch", ylabel="rank")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def low_rank_section(out: Path, number: int) -> str:
    """The report's section ``number``, from ``low_rank.csv`` alone."""
    from ..training import RANK_RTOL

    rows = read_csv(Path(out) / LOW_RANK_CSV)
    cols = ("wd", "epoch", "layer", "n_sv", "rank", "stable_rank", "effective_rank", "s_min_over_s_1")
    final = _last_epoch(rows) + _last_epoch(rows, refined=1)
    table = "\n".join(
        [
            "| " + " | ".join(("refined", *cols)) + " |",
            "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|",
        ]
        + ["| " + " | ".join(_fmt(v) for v in (r["refined"], *(r[c] for c in cols))) + " |" for r in final]
    )
    findings = []
    for r in _last_epoch(rows, last_layer=True):
        C = r["n_sv"]
        verdict = "rank W_L <= C-1 holds" if r["rank"] <= C - 1 else "rank W_L <= C-1 does not hold"
        findings.append(
            f"- lambda = {r['wd']:g}: W_L at the last epoch ({r['epoch']}) has {r['rank']} of {C} singular values "
            f"above RANK_RTOL s_1, s_C/s_1 = {r['s_min_over_s_1']:.3g}, effective rank "
            f"{r['effective_rank']:.3g}, stable rank {r['stable_rank']:.3g}: {verdict}."
        )
    for r in _last_epoch(rows, refined=1, last_layer=True):
        findings.append(
            f"- lambda = {r['wd']:g}, W_L refined to its critical point (§12.6): {r['rank']} of {r['n_sv']} "
            f"above the threshold, s_C/s_1 = {r['s_min_over_s_1']:.3g}."
        )
    ends = _last_epoch(rows)
    base = {r["layer"]: r for r in ends if r["wd"] == 0}
    for r in ends:
        if r["wd"] > 0 and r["layer"] in base:
            b = base[r["layer"]]
            findings.append(
                f"- W_{r['layer']}, lambda = {r['wd']:g} against 0: effective rank {r['effective_rank']:.3g} against "
                f"{b['effective_rank']:.3g} (ratio {r['effective_rank'] / b['effective_rank']:.2f}), stable rank "
                f"{r['stable_rank']:.3g} against {b['stable_rank']:.3g}."
            )
    return f"""## {number}. Low-rank bias (`{LOW_RANK_CSV}`, figure `{LOW_RANK_PNG}`)

The journal paper [XRLGP23] claims that SGD with weight decay biases the weights towards low rank,
with rank W_L <= C-1 under neural collapse. Measured on the runs of part 4 (no extra training): the
singular values of every layer at every epoch (`network/wd_*/singular_values.csv`), their numerical
rank (s_i > {RANK_RTOL:g} s_1), stable rank sum s_i^2/s_1^2 and effective rank exp(entropy of
s_i/sum s_j) (Roy and Vetterli 2007; `ufm.experiments.low_rank`, docs/theory.md §16.1). The last SGD
epoch of each run (refined = 0) and the refined last layer (refined = 1):

{table}

{chr(10).join(findings)}

Why W_L keeps rank C here (docs/theory.md §16.1): the network's last layer has no bias, and a
network that fits one-hot targets cannot have rank W_L < C. With F = W_L H (C, n) and the targets T
(C, n), whose singular values are all sqrt(N), Weyl's inequality gives
s_C(W_L) ||H||_2 >= s_C(F) >= sqrt(N) - ||T - F||_2 > 0 as soon as ||T - F||_2 < sqrt(N). The
bias-free UFM minimizer is accordingly an orthogonal frame of rank C (§5.2); rank C - 1 belongs to
the simplex ETF, which needs a bias (or centred outputs) to carry the mean output 1/C. The claim
is therefore read on the hidden layers, whose effective and stable ranks are compared above.

![low rank]({LOW_RANK_PNG})
"""
