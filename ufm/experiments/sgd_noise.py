"""Intrinsic SGD noise at quasi-interpolation (Xu, Rangamani, Liao, Galanti and Poggio 2023;
docs/theory.md §16.3): a part of ``ufm reproduce``.

Claim [XRLGP23]: with weight decay, SGD does not settle at quasi-interpolation; the weights and the
outputs keep fluctuating, and the noise is intrinsic: produced by the trade-off between the decay
and fitting the data, not by the randomness of sampling.

Design. From the end of a run of :func:`ufm.training.train` (its checkpoint: in ``ufm reproduce``
the networks of part 4, with and without weight decay), SGD continues at a constant learning rate
for ``BURN_IN`` steps and then a window of whole epochs (``GRIDS``) at each point of two
one-at-a-time sweeps (learning rates at the run's batch size, batch sizes at its last learning
rate), twice: with the same batch order every epoch (``batch_order="fixed"``: SGD is a deterministic
map of period one epoch) and with a fresh order every epoch (``"shuffle"``). Over the window's steps
the fluctuation of each W_k and of the outputs on the probe set about its linear trend (weight
decay's deterministic drift) is split exactly (equal steps per epoch) into a within-epoch and a
between-epoch part,

    total^2 = within^2 + between^2,     each relative to ||mean||^2 (§16.3),

and the sampling part is sampling^2 = total^2(shuffle) - total^2(fixed): at a fixed order every
epoch repeats (between = 0 on the periodic orbit) and the within-epoch part has the law it has under
shuffling, so what shuffling adds is the between-epoch part. ``sampling`` is reported only where
total^2 - fixed^2 exceeds ``Z_SAMPLING`` standard errors (estimated from the spread of the
per-epoch within parts); elsewhere it is not distinguishable from zero (empty). The shuffled run's
own between-epoch part is the second, direct estimate of the same quantity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._threads import one_torch_thread
from .._validation import check_positive_int
from ..tables import read_csv, write_csv
from ..training import (
    CONFIG,
    TrainConfig,
    _Checkpoint,
    _epoch_order,
    _run_epoch,
    _SGDNoise,
    _tensors,
    _TrainState,
    _Welford,
    resolve_device,
    train,
)

__all__ = [
    "BURN_IN",
    "GRIDS",
    "NOISE_WDS",
    "Z_SAMPLING",
    "SGDNoiseExperiment",
    "WindowSplit",
    "detrended_split",
    "plot_sgd_noise",
    "sampling_part",
    "sgd_noise_experiment",
    "sgd_noise_section",
]

# Weight decays compared: none and the default (the networks of part 4 of ``ufm reproduce``).
NOISE_WDS = (0.0, TrainConfig.wd)
# One-at-a-time sweeps from the starting run's last learning rate eta_0 and batch size B_0: learning
# rates eta_0 * factor at B_0, and batch sizes at eta_0 (they divide the n training examples of the
# mode's network: 500 in quick mode, 1,000 in full mode).
# The window: at least ``epochs`` epochs (the between-epoch part needs several) and ``steps`` steps.
GRIDS = {
    "quick": dict(lr_factors=(1.0, 3.0, 10.0), batch_sizes=(25, 50), epochs=6, steps=120),
    "full": dict(lr_factors=(1.0, 3.0, 10.0, 30.0), batch_sizes=(25, 50, 100, 200), epochs=10, steps=240),
}
# Burn-in in SGD steps, rounded up to whole epochs. Measured on the quick network (docs/theory.md
# §16.3): the fixed-order within part's second half over its first is 0.20-0.81 without burn-in,
# 0.97-1.17 after 20 steps and 1.00-1.04 after 100.
BURN_IN = 100
# The sampling part is reported where total^2 - fixed^2 exceeds this many standard errors.
Z_SAMPLING = 2.0
QUANTITIES_OUT = "out"  # the outputs on the probe set; the layers are W1..WL


class _EpochMoments(_Welford):
    """Welford's moments of one epoch's ``m`` steps, plus C = sum_t (t - (m-1)/2) x_t, the covariance
    with the step index t = 0..m-1 that removing a linear trend needs (:func:`detrended_split`)."""

    def __init__(self, m: int):
        super().__init__()
        self.m, self.C = m, None

    def add(self, x) -> None:
        weight = self.count - (self.m - 1) / 2
        x = x.detach()  # float64 moments of any float x, as _Welford's (add_ promotes, no copy)
        self.C = weight * x.double() if self.C is None else self.C.add_(x, alpha=weight)
        super().add(x)


@dataclass(frozen=True)
class WindowSplit:
    """The fluctuation of a stream about its linear trend over K epochs of m steps (§16.3).

    Attributes
    ----------
    within : (K,) within_e = 1/m sum_{t in e} ||r_t - rbar_e||^2, r_t the detrended stream.
    between : 1/K sum_e ||rbar_e||^2, the spread of the epoch means about the trend.
    mean_sq : ||xbar||^2 of the window mean.
    slope_sq : ||b||^2 of the removed trend's slope (per step).
    m : steps per epoch.
    """

    within: np.ndarray
    between: float
    mean_sq: float
    slope_sq: float
    m: int

    @property
    def total_sq(self) -> float:
        """1/(K m) sum_t ||r_t||^2 / ||xbar||^2 = (mean within + between)/||xbar||^2."""
        return float(np.mean(self.within) + self.between) / self.mean_sq

    @property
    def drift(self) -> float:
        """The removed trend per epoch, ||b|| m/||xbar||."""
        return math.sqrt(self.slope_sq / self.mean_sq) * self.m


def detrended_split(means: np.ndarray, covs: np.ndarray, ss: np.ndarray, m: int) -> WindowSplit:
    """Within- and between-epoch parts of a stream's fluctuation about its linear trend (§16.3).

    The stream x_t (d,), t = 0..Km-1, is K epochs of m steps; each coordinate's least-squares line
    a + b t over the window is removed, leaving r_t, and then exactly (equal steps per epoch)

        1/(K m) sum_t ||r_t||^2 = mean_e within_e + between.

    Parameters
    ----------
    means : (K, d) epoch means mu_e.
    covs : (K, d) C_e = sum_{t'=0}^{m-1} (t' - (m-1)/2) x_{e m + t'}.
    ss : (K,) sum over coordinates and steps of epoch e of (x_t - mu_e)^2.
    m : steps per epoch.
    """
    K = means.shape[0]
    xbar = means.mean(axis=0)  # (d,)
    tau = m * (np.arange(K) - (K - 1) / 2)  # (K,) epoch centres minus the window's centre
    ramp = m * (m * m - 1) / 12  # sum_{t'} (t' - (m-1)/2)^2
    # b = sum_t (t - tbar)(x_t - xbar) / sum_t (t - tbar)^2, split over the epochs
    b = (covs.sum(axis=0) + m * tau @ (means - xbar)) / (K * ramp + m * np.sum(tau**2))  # (d,)
    within = (ss - 2 * covs @ b + ramp * (b @ b)) / m  # (K,)
    between = float(np.mean(np.sum((means - xbar - tau[:, None] * b) ** 2, axis=1)))
    return WindowSplit(within, between, float(xbar @ xbar), float(b @ b), m)


def sampling_part(total_sq: float, fixed_sq: float, se_sq: float, *, z: float = Z_SAMPLING) -> float | None:
    """sqrt(total^2 - fixed^2) (§16.3), or None where the difference is within ``z`` standard errors
    ``sqrt(se_sq)`` of zero (not distinguishable from zero)."""
    diff = total_sq - fixed_sq
    return math.sqrt(diff) if diff > z * math.sqrt(se_sq) else None


@dataclass(frozen=True)
class _Start:
    """A trained network to continue from: its run directory, configuration, data and weights."""

    run: Path
    config: TrainConfig
    dataset: object  # ufm.datasets.Dataset
    data: object  # ufm.training._Tensors, on ``device``
    weights: dict
    lr: float  # the learning rate of the run's last SGD epoch
    reference_loss: float  # the run's loss at initialization (for the divergence test)
    device: torch.device


def _load_start(run: Path) -> _Start:
    """The end of the SGD epochs of the run in ``run`` (its checkpoint; a refinement is not saved there)."""
    try:
        config = TrainConfig(**json.loads((run / CONFIG).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot continue the run in {run}: no readable {CONFIG} ({err})") from None
    device = resolve_device(config.device)
    dataset, data = _tensors(config, None, device)
    state = _TrainState.start(config, dataset, device)
    checkpoint = _Checkpoint(run)
    if not checkpoint.exists():
        raise ValueError(f"cannot continue the run in {run}: it holds no checkpoint; train it with out={run}")
    checkpoint.restore(state, config, device)
    if state.epoch != config.epochs:
        raise ValueError(
            f"the run in {run} stopped after epoch {state.epoch} of {config.epochs}; resume it first"
        )
    last = [row for row in state.history if not row.get("refined")][-1]
    return _Start(
        run,
        config,
        dataset,
        data,
        state.model.state_dict(),
        last["lr"],
        state.history[0]["train_loss"],
        device,
    )


def _epochs(m: int, window: tuple[int, int]) -> tuple[int, int]:
    """(burn-in epochs, window epochs) at m steps an epoch: BURN_IN steps, then ``window`` = (at least
    so many epochs, at least so many steps)."""
    return math.ceil(BURN_IN / m), max(window[0], math.ceil(window[1] / m))


def _continue(
    start: _Start, *, lr: float, batch_size: int, order: str, seed: int, window: tuple[int, int]
) -> tuple[dict, dict]:
    """SGD from ``start`` at constant ``lr`` and ``batch_size`` in batch ``order``: BURN_IN steps, then a
    window of at least ``window`` = (epochs, steps), whole epochs, tracked step by step. Returns ({quantity: _Fluctuation}, end-of-window
    training accuracy and loss)."""
    config = replace(
        start.config, lr=lr, batch_size=batch_size, batch_order=order, seed=seed, schedule="constant",
        refine_to=None,
    )  # fmt: skip
    x, y = start.data.x_train, start.data.y_train
    n = y.shape[0]
    if n % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the {n} training examples of {start.run}")
    m = n // batch_size
    burn_in, window = _epochs(m, window)
    state = _TrainState.start(config, start.dataset, start.device)
    model = state.model
    model.load_state_dict(start.weights)
    model.train()
    epochs = []
    for epoch in range(1, burn_in + window + 1):
        noise = _SGDNoise(len(model.layers), tracker=lambda: _EpochMoments(m)) if epoch > burn_in else None
        batches = _epoch_order(state, config, n).to(start.device)
        if _run_epoch(state, start.data, config, batches, lambda: start.reference_loss, noise) is not None:
            raise ValueError(
                f"SGD diverged continuing {start.run} at lr={lr:g}, batch size {batch_size} ({order} order) "
                f"in epoch {epoch}; lower the sweep's learning rates"
            )
        if noise is not None:
            epochs.append([*noise.layers, noise.outputs])
    names = [f"W{k}" for k in range(1, len(model.layers) + 1)] + [QUANTITIES_OUT]
    parts = {}
    for name, trackers in zip(names, zip(*epochs)):
        means = np.stack([t.mean.flatten().cpu().numpy() for t in trackers])  # (K, d)
        covs = np.stack([t.C.flatten().cpu().numpy() for t in trackers])  # (K, d)
        parts[name] = detrended_split(means, covs, np.array([float(t.m2.sum()) for t in trackers]), m)
    with torch.no_grad():
        f = model(x)
        end = {
            "train_acc": float((f.argmax(1) == y).double().mean()),
            "train_loss": float(config.data_loss.torch_value(f, y, start.data.C)),
        }
    return parts, end


@dataclass(frozen=True)
class SGDNoiseExperiment:
    """Outcome of :func:`sgd_noise_experiment`.

    Attributes
    ----------
    rows : tuple of dict
        One row per (weight decay, sweep, batch size, learning rate, quantity): the relative
        fluctuation ``total`` (fresh order every epoch), ``fixed`` (one order), ``sampling`` (None where
        not distinguishable from zero) and ``sampling_z``, the shuffled run's ``between`` part, the
        fixed-order run's ``fixed_between`` (zero on a periodic orbit) and ``fixed_settle`` (its
        within part in the window's second half over the first: 1 once the burn-in is over), the
        removed trends ``drift``/``fixed_drift`` per epoch, and the end of the window's ``train_acc``
        and ``train_loss``.
    exponents : tuple of dict
        Per (weight decay, quantity, sweep, part): the least-squares ``exponent`` of part ~ x^exponent
        and ``rms_log10``, the RMS residual of log10(part) (how well a power law fits).
    table, exponents_table, figure : Path or None
        ``sgd_noise.csv``, ``sgd_noise_exponents.csv`` and ``sgd_noise.png`` when ``out`` was given.
    seconds : float
    """

    rows: tuple[dict, ...]
    exponents: tuple[dict, ...]
    table: Path | None
    exponents_table: Path | None
    figure: Path | None
    seconds: float


def _pair_rows(point: dict, fixed: dict, shuffled: dict, end: dict) -> list[dict]:
    """The table's rows of one (B, eta) point: each quantity's parts, from its fixed-order and
    shuffled windows (``WindowSplit`` by quantity)."""
    rows = []
    for name, s in shuffled.items():
        f = fixed[name]
        K = len(s.within)
        within = s.within / s.mean_sq  # (K,) relative
        # The standard error of total^2 - fixed^2 were the sampling part zero: the fixed order's
        # within part is one draw of the law of the K shuffled epochs' (§16.3).
        se_sq = float(np.var(within, ddof=1)) * (1 + 1 / K)
        diff = s.total_sq - f.total_sq
        rows.append(point | {
            "quantity": name, "total": math.sqrt(s.total_sq), "fixed": math.sqrt(f.total_sq),
            "sampling": sampling_part(s.total_sq, f.total_sq, se_sq),
            "sampling_z": diff / math.sqrt(se_sq) if se_sq > 0 else None,
            "between": math.sqrt(s.between / s.mean_sq), "fixed_between": math.sqrt(f.between / f.mean_sq),
            "fixed_settle": float(np.mean(f.within[K // 2 :]) / np.mean(f.within[: K // 2])),
            "drift": s.drift, "fixed_drift": f.drift,
        } | end)  # fmt: skip
    return rows


def _power_law(x: Sequence[float], y: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Least-squares exponent of y ~ x^a over the points with y > 0, and the RMS residual of log10 y
    (None with fewer than 2 points, the residual with fewer than 3)."""
    pts = np.array([(math.log10(a), math.log10(b)) for a, b in zip(x, y) if b is not None and b > 0])
    if len(pts) < 2:
        return None, None
    coef = np.polyfit(pts[:, 0], pts[:, 1], 1)
    rms = float(np.sqrt(np.mean((np.polyval(coef, pts[:, 0]) - pts[:, 1]) ** 2))) if len(pts) > 2 else None
    return float(coef[0]), rms


_PARTS = ("fixed", "sampling", "total")
_SWEEPS = {"lr": "lr", "batch_size": "batch_size"}  # sweep name -> the column swept


def _exponents(rows: Sequence[dict]) -> list[dict]:
    keys = dict.fromkeys((r["wd"], r["quantity"], r["sweep"]) for r in rows)
    out = []
    for wd, quantity, sweep in keys:
        sub = [r for r in rows if (r["wd"], r["quantity"], r["sweep"]) == (wd, quantity, sweep)]
        for part in _PARTS:
            exponent, rms = _power_law([r[_SWEEPS[sweep]] for r in sub], [r[part] for r in sub])
            out.append({
                "wd": wd, "quantity": quantity, "sweep": sweep, "part": part, "exponent": exponent,
                "rms_log10": rms, "points": sum(r[part] is not None for r in sub),
            })  # fmt: skip
    return out


def _train_starts(
    wds: Sequence[float], quick: bool, where: Path, progress: bool, overrides: dict
) -> list[Path]:
    """Train the default network (quick: weight_decay.QUICK_OVERRIDES) once per weight decay."""
    from .weight_decay import QUICK_OVERRIDES

    runs = []
    for wd in wds:
        config = TrainConfig(**((QUICK_OVERRIDES if quick else {}) | overrides | {"wd": wd}))
        runs.append(train(config, out=where / f"wd_{wd:g}", overwrite=True, progress=progress).out)
    return runs


def sgd_noise_experiment(
    starts: Sequence[str | Path] | None = None,
    *,
    quick: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
    wds: Sequence[float] = NOISE_WDS,
    lr_factors: Sequence[float] | None = None,
    batch_sizes: Sequence[int] | None = None,
    **overrides,
) -> SGDNoiseExperiment:
    """The fixed-order and sampling parts of SGD's fluctuation at quasi-interpolation, against batch
    size and learning rate, with and without weight decay (module docstring; docs/theory.md §16.3).

    Parameters
    ----------
    starts : sequence of run directories, optional
        Finished runs of :func:`ufm.training.train` (their ``checkpoint.pt`` and ``config.json``) to
        continue from, one per weight decay (in ``ufm reproduce``: part 4's). Without them the
        default network is trained once per weight decay in ``wds`` (quick: the quick network).
    quick : bool
        The quick grid and window of ``GRIDS`` (else the full ones).
    out : str or Path, optional
        Directory for ``sgd_noise.csv``, ``sgd_noise_exponents.csv`` and ``sgd_noise.png``.
    seed : int
        Seeds the batch orders (point i of the grid: seed + 300 + i).
    wds : weight decays of the networks trained when ``starts`` is not given.
    lr_factors, batch_sizes : the sweeps (default: ``GRIDS``); learning rates are multiples of each
        run's last learning rate, batch sizes must divide its training set.
    **overrides
        :class:`~ufm.training.TrainConfig` fields for the networks trained when ``starts`` is not
        given (``epochs``, ``per_class``, ...).
    """
    import tempfile
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    grid = GRIDS["quick" if quick else "full"]
    lr_factors = grid["lr_factors"] if lr_factors is None else tuple(lr_factors)
    batch_sizes = grid["batch_sizes"] if batch_sizes is None else tuple(batch_sizes)
    for B in batch_sizes:
        check_positive_int("batch size", B)
    if not lr_factors or not batch_sizes or min(lr_factors) <= 0:
        raise ValueError(
            f"the sweeps need positive lr_factors and batch_sizes, got {lr_factors!r}, {batch_sizes!r}"
        )
    if starts is not None and len(starts) == 0:
        raise ValueError("starts is empty: give at least one run directory (or None to train the networks)")
    out = None if out is None else Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        if starts is None:
            where = (out or Path(scratch)) / "sgd_noise_runs"
            starts = _train_starts(wds, quick, where, progress, {"seed": seed} | overrides)
        loaded = [_load_start(Path(run)) for run in starts]
    jobs = []
    for start in loaded:
        B0, lr0 = start.config.batch_size, start.lr
        points = [("lr", B0, lr0 * f) for f in lr_factors] + [("batch_size", B, lr0) for B in batch_sizes]
        jobs += [(start, sweep, B, lr) for sweep, B, lr in points]
    rows, done = [], {}
    with one_torch_thread():
        for i, (start, sweep, B, lr) in enumerate(tqdm(jobs, desc="SGD noise", disable=not progress)):
            key = (start.run, B, lr)  # the base point is in both sweeps: run once
            if key not in done:
                kw = dict(lr=lr, batch_size=B, seed=seed + 300 + i, window=(grid["epochs"], grid["steps"]))
                fixed, _ = _continue(start, order="fixed", **kw)
                done[key] = (fixed, *_continue(start, order="shuffle", **kw))
            fixed, shuffled, end = done[key]
            m = start.data.y_train.shape[0] // B
            burn_in, window = _epochs(m, (grid["epochs"], grid["steps"]))
            point = {
                "wd": start.config.wd, "sweep": sweep, "batch_size": B, "lr": lr, "steps_per_epoch": m,
                "burn_in_steps": burn_in * m, "window_epochs": window, "window_steps": window * m,
            }  # fmt: skip
            rows += _pair_rows(point, fixed, shuffled, end)
    exponents = _exponents(rows)
    table = exp_table = figure = None
    if out is not None:
        table = write_csv(out / "sgd_noise.csv", rows)
        exp_table = write_csv(out / "sgd_noise_exponents.csv", exponents)
        figure = plot_sgd_noise(read_csv(table), out / "sgd_noise.png")
    return SGDNoiseExperiment(
        rows=tuple(rows), exponents=tuple(exponents), table=table, exponents_table=exp_table, figure=figure,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _last_layer(rows: Sequence[dict]) -> str:
    """The name of W_L among the quantities (W1..WL, out)."""
    return max((r["quantity"] for r in rows if r["quantity"] != QUANTITIES_OUT), key=lambda q: int(q[1:]))


def plot_sgd_noise(rows: list[dict], path: str | Path) -> Path:
    """Claim [XRLGP23] (docs/theory.md §16.3): at quasi-interpolation with weight decay SGD keeps
    fluctuating, also at a fixed batch order. The fixed-order part (solid) and the sampling part
    (dashed; missing where not distinguishable from zero) of the fluctuation of the outputs and of
    W_L, against the learning rate (top) and the batch size (bottom), one colour per weight decay.

    Parameters
    ----------
    rows : rows of sgd_noise.csv.
    path : output file.
    """
    from matplotlib.ticker import NullFormatter

    from .plots import _figure, _save

    quantities = (QUANTITIES_OUT, _last_layer(rows))
    fig, axes = _figure(2, 2, (10, 7))
    wds = sorted({r["wd"] for r in rows})
    for i, sweep in enumerate(_SWEEPS):
        for j, quantity in enumerate(quantities):
            ax = axes[i, j]
            for c, wd in enumerate(wds):
                sub = [r for r in rows if (r["sweep"], r["quantity"], r["wd"]) == (sweep, quantity, wd)]
                x = np.array([float(r[_SWEEPS[sweep]]) for r in sub])
                for part, style in (("fixed", "o-"), ("sampling", "s--")):
                    y = np.array([np.nan if r[part] in (None, "") else float(r[part]) for r in sub])
                    ax.plot(x, y, style, color=f"C{c}", label=f"{part}, lambda = {wd:g}")
            ax.set(xscale="log", yscale="log", xlabel="learning rate" if sweep == "lr" else "batch size",
                   ylabel=f"relative fluctuation of {'f(probe)' if quantity == QUANTITIES_OUT else quantity}")  # fmt: skip
            ticks = sorted({float(r[_SWEEPS[sweep]]) for r in rows if r["sweep"] == sweep})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the swept values, not log-axis minor labels
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("SGD noise at quasi-interpolation: fixed batch order vs fresh sampling", fontsize=10)
    return _save(fig, path)


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or v == "" else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _span(values) -> str:
    """'a' or 'a-b', the range of some integers."""
    values = sorted(set(values))
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _md(rows: Sequence[dict], cols: Sequence[str]) -> str:
    return "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    )


def _answer(base: Sequence[dict], fits: Sequence[dict], wds: Sequence[float], last: str) -> str:
    """The claim's answer, from the base point's rows and the fitted exponents (with weight decay)."""
    wd = wds[-1]

    def at(w, quantity, key):
        return next(r[key] for r in base if (r["wd"], r["quantity"]) == (w, quantity))

    def exponent(sweep):
        e = [
            f
            for f in fits
            if (f["wd"], f["quantity"], f["sweep"], f["part"]) == (wd, QUANTITIES_OUT, sweep, "fixed")
        ]
        return e[0]["exponent"] if e else None

    share = at(wd, QUANTITIES_OUT, "fixed") ** 2 / at(wd, QUANTITIES_OUT, "total") ** 2
    orbit = at(wd, QUANTITIES_OUT, "fixed_between") / at(wd, QUANTITIES_OUT, "fixed")
    lines = [
        f"**Answer** (lambda = {wd:g}, outputs unless said). Without sampling randomness the noise "
        f"remains: at a fixed order the outputs keep {share:.0%} of the variance they have under fresh "
        f"sampling ({last}: {at(wd, last, 'fixed') ** 2 / at(wd, last, 'total') ** 2:.0%}), so the noise is "
        f"{'not only' if share >= 0.1 else 'mostly'} the randomness of sampling (a share of 10% or more "
        "counts as support for the claim here)."
    ]
    if len(wds) > 1:
        ratio = {q: at(wd, q, "fixed") / at(wds[0], q, "fixed") for q in (QUANTITIES_OUT, last)}
        lines.append(
            f"Weight decay {'raises' if ratio[QUANTITIES_OUT] > 1 else 'does not raise'} the outputs' "
            f"fixed-order part: {ratio[QUANTITIES_OUT]:.3g} times that at lambda = {wds[0]:g} at the same "
            f"learning rate and batch size ({last}'s: {ratio[last]:.3g} times)."
        )
    a, b = exponent("lr"), exponent("batch_size")
    if a is not None and b is not None:
        lines.append(
            f"It is a finite-step effect: the fixed-order part scales as eta^{a:.2f} B^{b:.2f} "
            "(the first estimate of §16.3: eta^1 B^-1), so it vanishes as the learning rate goes to zero."
        )
    first = at(wd, "W1", "fixed_between") / at(wd, "W1", "fixed")
    lines.append(
        f"At a fixed order the outputs {'come close to' if orbit < 0.3 else 'do not settle on'} a "
        f"periodic orbit: their epoch-to-epoch part is {orbit:.2g} of the fixed-order part (0 on the orbit)"
        + ("; what remains there is mostly a periodic motion, not a chaotic one" if orbit < 0.3 else "")
        + f" (W1: {first:.2g}{', it has not settled within the window' if first >= 0.3 else ''})."
    )
    return " ".join(lines)


def sgd_noise_section(out: Path, number: int = 9) -> str:
    """The report's section, from sgd_noise.csv and sgd_noise_exponents.csv alone."""
    rows = read_csv(out / "sgd_noise.csv")
    exps = read_csv(out / "sgd_noise_exponents.csv")
    last = _last_layer(rows)
    wds = sorted({r["wd"] for r in rows})
    base = [
        r for r in rows if r["sweep"] == "lr" and r["lr"] == min(q["lr"] for q in rows if q["wd"] == r["wd"])
    ]
    sweeps = [r for r in rows if r["quantity"] in (QUANTITIES_OUT, last)]
    fits = [e for e in exps if e["quantity"] in (QUANTITIES_OUT, last) and e["part"] != "total"]

    def at(wd, quantity, key):
        return next(r[key] for r in base if (r["wd"], r["quantity"]) == (wd, quantity))

    findings = []
    for q in (QUANTITIES_OUT, last):
        fixed = {wd: at(wd, q, "fixed") for wd in wds}
        share = {wd: at(wd, q, "fixed") ** 2 / at(wd, q, "total") ** 2 for wd in wds}
        findings.append(
            f"- {q}: fixed-order part " + ", ".join(f"{_fmt(fixed[wd])} at lambda = {wd:g}" for wd in wds)
            + (f" (ratio {_fmt(fixed[wds[-1]] / fixed[wds[0]])})" if len(wds) > 1 and fixed[wds[0]] else "")
            + "; its share of total^2: " + ", ".join(f"{share[wd]:.0%} at lambda = {wd:g}" for wd in wds)
        )  # fmt: skip
    agree = [r["sampling"] / r["between"] for r in rows if r["sampling"] is not None and r["between"]]
    if agree:
        findings.append(
            f"- the two estimates of the sampling part, sqrt(total^2 - fixed^2) over the shuffled run's "
            f"between-epoch part: median {np.median(agree):.3g}, range {min(agree):.3g}-{max(agree):.3g} "
            f"({len(agree)} rows; 1 where the orbit's shape has the same law under both orders)"
        )
    n_none = sum(r["sampling"] is None for r in rows)
    periodic = max(r["fixed_between"] / r["fixed"] for r in rows if r["fixed"])
    settle = [r["fixed_settle"] for r in rows]
    burn, window = (_span(r[key] for r in rows) for key in ("burn_in_steps", "window_steps"))
    return f"""## {number}. Intrinsic SGD noise (`sgd_noise.csv`, `sgd_noise_exponents.csv`, figure `sgd_noise.png`)

Claim [XRLGP23]: with weight decay SGD keeps fluctuating at quasi-interpolation, and the noise is not
only the randomness of sampling. From the end of part 4's runs (lambda = {", ".join(f"{wd:g}" for wd in wds)}),
SGD continues at constant learning rates (multiples of the run's last one) and batch sizes, once with
one batch order every epoch (`fixed`) and once with a fresh order every epoch (`total`); after a
burn-in of {burn} steps, over a window of {window} steps (whole epochs), the
fluctuation of each W_k and of the outputs on the probe set about its linear trend (the trend,
`drift` per epoch, is removed), relative to the mean (docs/theory.md §16.3). `sampling` =
sqrt(total^2 - fixed^2), empty where not distinguishable from zero ({n_none} of {len(rows)} rows,
at {Z_SAMPLING:g} standard errors); `between`: the shuffled run's between-epoch part, a direct
estimate of the same quantity. `fixed_between` is the fixed-order run's between-epoch part (zero on a
periodic orbit): at most {periodic:.2g} of `fixed`. `fixed_settle` (within part, second half of the
window over the first) lies in [{min(settle):.3g}, {max(settle):.3g}].

At the base point (the run's batch size and last learning rate):

{_md(base, ("wd", "quantity", "batch_size", "lr", "total", "fixed", "sampling", "sampling_z", "between", "fixed_between", "drift", "train_acc", "train_loss"))}

Findings at the base point:

{chr(10).join(findings)}

{_answer(base, fits, wds, last)}

Across the sweeps (outputs and {last}):

{_md(sweeps, ("wd", "quantity", "sweep", "batch_size", "lr", "fixed", "sampling", "between", "total"))}

Power laws part ~ x^exponent (least squares in log-log; `rms_log10`: the fit's RMS residual in decades):

{_md(fits, ("wd", "quantity", "sweep", "part", "exponent", "rms_log10", "points"))}

![SGD noise](sgd_noise.png)
"""
