"""The poster's experiment (Figs. 1-2): the same network trained without weight decay and with two
weight decays, the last epoch's collapse measures set beside the theorem's predictions.

Built on :func:`ufm.training.train`; the figure comes from :mod:`ufm.experiments.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._validation import check_nonneg
from ..datasets import load_dataset
from ..tables import write_csv
from ..training import TrainConfig, TrainResult, train

__all__ = [
    "EXPERIMENT_WDS",
    "QUICK_OVERRIDES",
    "REFINE_TOL",
    "WeightDecayExperiment",
    "format_theory_table",
    "weight_decay_experiment",
]

# Weight decays compared: none, the default, and twice the default.
EXPERIMENT_WDS = (0.0, TrainConfig.wd, 2 * TrainConfig.wd)

# Quick mode (smoke tests, ``ufm reproduce --quick``): 50 digits per class, 1,200 steps, about 10 s a
# run. The larger learning rate keeps lr * wd * steps high enough that the effect still shows (measured:
# NC3 4.0x and NC1 4.7x lower with the default lambda than without; zero training error in both).
QUICK_OVERRIDES = {"per_class": 50, "batch_size": 25, "epochs": 60, "lr": 0.05}

# Columns of the theory-vs-measurement table, (key, heading).
_TABLE_COLUMNS = (
    ("wd", "lambda"),
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("nc1", "NC1"),
    ("nc2_equinorm", "NC2 norm"),
    ("nc2_equiangle", "NC2 angle"),
    ("nc3", "NC3"),
    ("nc4", "NC4"),
    ("eps", "eps"),
    ("sqi_spread", "SQI spread"),
    ("w_row_norm_sq", "|W_c|^2"),
    ("w_row_norm_sq_pred", "|W_c|^2 thm"),
    ("w_scale", "NC3 scale"),
    ("w_scale_pred", "scale thm"),
    ("w_cos_mean", "cos W"),
    ("w_cos_pred", "cos thm"),
    ("wl_sv_ratio", "s_C/s_1 W_L"),
    ("rho", "rho"),
    ("noise_out", "SGD noise f"),
)


# Runs with weight decay end with the last layer refined to this stationarity residual (§12.6), so
# each miss of the theorem splits into what SGD's non-stationarity and the SQI violation cause.
REFINE_TOL = 1e-4

# Columns of the prediction-error table (docs/theory.md §12), (key, heading): per run, at SGD's end
# and after the refinement, the residuals, then each prediction's relative error, its two exact
# parts (signed, summing to the signed error) and its bound.
_ERROR_COLUMNS = (
    ("wd", "lambda"),
    ("point", "point"),
    ("stationarity_residual", "stat. resid."),
    ("sqi_residual", "SQI resid."),
    ("w_scale_err", "scale err"),
    ("w_scale_part_stationarity", "scale: stat."),
    ("w_scale_part_sqi", "scale: SQI"),
    ("w_scale_bound", "scale bound"),
    ("w_row_norm_sq_err", "|W_c|^2 err"),
    ("w_row_norm_sq_part_stationarity", "|W_c|^2: stat."),
    ("w_row_norm_sq_part_sqi", "|W_c|^2: SQI"),
    ("w_row_norm_sq_bound", "|W_c|^2 bound"),
    ("w_cos_err", "cos err"),
    ("gram_part_stationarity", "Gram: stat."),
    ("gram_part_sqi", "Gram: SQI"),
    ("w_cos_bound", "cos bound"),
)


@dataclass(frozen=True)
class WeightDecayExperiment:
    """Outcome of :func:`weight_decay_experiment`.

    Attributes
    ----------
    results : tuple of TrainResult
        One run per weight decay, same seed, data and schedule.
    table : tuple of dict
        One row per run: the last SGD epoch's measures beside the theorem's predictions (``*_pred``,
        None without weight decay); keys as in ``_TABLE_COLUMNS``.
    errors : tuple of dict
        For each run with weight decay, two rows (``point`` "SGD end" and "W_L refined"): the
        prediction errors, their stationarity and SQI parts and bounds; keys as in ``_ERROR_COLUMNS``.
    figure : Path or None
        NC1-NC4 and training error against epoch (:func:`ufm.experiments.plots.plot_nc_training`).
    """

    results: tuple[TrainResult, ...]
    table: tuple[dict, ...]
    errors: tuple[dict, ...]
    figure: Path | None

    @property
    def histories(self) -> dict[str, dict[str, np.ndarray]]:
        """Label ``"lambda = <wd>"`` -> history, one per run."""
        return _labelled_histories(self.results)


def _labelled_histories(results: Sequence[TrainResult]) -> dict[str, dict[str, np.ndarray]]:
    return {f"lambda = {r.config.wd:g}": r.history for r in results}


def weight_decay_experiment(
    *,
    wds: Sequence[float] = EXPERIMENT_WDS,
    quick: bool = False,
    out: str | Path | None = None,
    progress: bool = False,
    **overrides,
) -> WeightDecayExperiment:
    """The poster's experiment (Figs. 1-2): collapse with weight decay and not without it.

    Trains the default network (:class:`TrainConfig`) once per weight decay in ``wds``, with the same
    seed, data and learning-rate schedule, then tabulates the last epoch's NC1-NC4 and the theorem's
    predictions at the measured eps (docs/theory.md §4.1) and draws NC1-NC4 against epoch.

    Parameters
    ----------
    wds : sequence of float
        Weight decays lambda (default: 0, the default lambda and twice it).
    quick : bool
        Use ``QUICK_OVERRIDES`` (about 10 s a run on a CPU) instead of the full defaults (minutes).
    out : str or Path, optional
        Directory for one sub-directory per run (``wd_<lambda>``), the figure ``nc_weight_decay.png``
        and the table ``theory_vs_measurement.csv``. Without it nothing is written and no figure made.
    progress : bool
        Progress bars on stderr.
    **overrides
        Any other :class:`TrainConfig` field (``seed``, ``device``, ``epochs``, ...).

    Returns
    -------
    WeightDecayExperiment
    """
    if len(wds) == 0:
        raise ValueError("wds is empty: give at least one weight decay")
    settings = (QUICK_OVERRIDES if quick else {}) | overrides
    configs = [
        TrainConfig(
            **(settings | {"wd": check_nonneg("wd", wd), "refine_to": REFINE_TOL if wd > 0 else None})
        )
        for wd in wds
    ]
    data = load_dataset(
        configs[0].dataset, per_class=configs[0].per_class, test_per_class=configs[0].test_per_class
    )
    out = None if out is None else Path(out)
    results = tuple(
        train(c, out=None if out is None else out / f"wd_{c.wd:g}", progress=progress, dataset=data)
        for c in configs
    )
    table = tuple(
        {
            key: r.config.wd if key == "wd" else _row(r, refined=False, noise=True).get(key)
            for key, _ in _TABLE_COLUMNS
        }
        for r in results
    )
    errors = tuple(
        {"wd": r.config.wd, "point": point}
        | {key: _row(r, refined=refined).get(key) for key, _ in _ERROR_COLUMNS[2:]}
        for r in results
        if r.config.refine_to is not None
        for point, refined in (("SGD end", False), ("W_L refined", True))
    )
    figure = None
    if out is not None:
        from .plots import plot_nc_training

        figure = plot_nc_training(_labelled_histories(results), out / "nc_weight_decay.png")
        write_csv(out / "theory_vs_measurement.csv", list(table))
        if errors:
            write_csv(out / "prediction_errors.csv", list(errors))
    return WeightDecayExperiment(results=results, table=table, errors=errors, figure=figure)


def _row(result: TrainResult, *, refined: bool, noise: bool = False) -> dict:
    """The last history row that is (or is not) the refined one, None where undefined; with the
    last epoch's SGD-noise measures when ``noise``."""
    h = result.history
    i = int(np.flatnonzero(h.get("refined", np.zeros_like(h["epoch"])) == float(refined))[-1])
    row = {k: None if not np.isfinite(v[i]) else float(v[i]) for k, v in h.items()}
    return row | ({k: v for k, v in result.final.items() if k.startswith("noise_")} if noise else {})


def format_theory_table(table: Sequence[dict], width: int | None = 100) -> str:
    """The theory-vs-measurement table as aligned text (4 significant digits; '-' where undefined).

    Lines longer than ``width`` characters are wrapped: the columns are split into blocks that fit,
    each block led by the lambda column and separated by a blank line. ``width=None``: one line per
    row, however long (``ufm train --wide``).
    """
    cells = [[f"{head:>11}" for _, head in _TABLE_COLUMNS]]
    for row in table:
        cells.append(
            [f"{'-' if row.get(key) is None else format(row[key], '.4g'):>11}" for key, _ in _TABLE_COLUMNS]
        )
    per_block = len(_TABLE_COLUMNS) if width is None else max(1, (width - 11) // 13)
    blocks = []
    for start in range(1, len(_TABLE_COLUMNS), per_block):
        columns = [0, *range(start, min(start + per_block, len(_TABLE_COLUMNS)))]
        blocks.append("\n".join("  ".join(line[c] for c in columns) for line in cells))
    return "\n\n".join(blocks)
