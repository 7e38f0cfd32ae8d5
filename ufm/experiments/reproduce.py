"""The main job, ``ufm reproduce``: theory against measurement, in one run.

Nine parts, each writing CSV tables and PNG figures into one directory; the Markdown report is then
written from those CSV files alone, so every number in it can be traced to a table beside it.

1. ``proofs``: the SymPy proof suite (``ufm.proofs``).
2. ``flows``: gradient flow of the UFM from random starts against the closed-form minimizer, for
   several weight decays, with and without a bias (docs/theory.md §5).
3. ``phase``: the collapse threshold. With lam_w = lam_h = lam the minimizer collapses iff
   lam < lam* = 1/(C sqrt(N)); closed-form eps against the flow's, and the flow's NC1, across lam/lam*.
4. ``network``: the poster's experiment (Figs. 1-2) on the embedded digits: a bias-free ReLU network
   trained with the square loss, without weight decay and with two weight decays.
5. ``minimizer phases``: the regularized bias's regimes, the depth thresholds (L = 1, 2, 3) and
   minority collapse, closed form against flow end points (``ufm.experiments.minimizer_phases``).
6. ``collapse time``: time to collapse against lambda, C, N and p, from random starts of the moment
   flow, beside the slow mode's prediction (``ufm.experiments.collapse_time``).
7. ``low rank``: the journal paper's low-rank bias, the singular values of every layer of part 4's
   runs over the epochs, numerical, stable and effective ranks (``ufm.experiments.low_rank``).
8. ``normalization``: the journal paper's rho = prod_k rho_k under weight normalization, a dense MLP
   against a CNN with local kernels, with and without weight decay (``ufm.experiments.normalization``).
9. ``SGD noise``: the fluctuation of part 4's networks continued at several batch sizes and learning
   rates, its fixed-batch-order and sampling parts, with and without weight decay
   (``ufm.experiments.sgd_noise``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._validation import output_directory
from ..model import UFMProblem
from ..tables import read_csv, write_csv
from .collapse_time import collapse_time_section, run_collapse_time
from .compare import AGREEMENT_RTOL, compare_flow
from .low_rank import low_rank_section, run_low_rank
from .normalization import normalization_section, run_normalization

# Sizes of the UFM parts: small enough for 2 CPU cores, large enough that C, N and p all matter.
FLOW_SIZES = {"quick": dict(C=4, N=5, extra_dim=2), "full": dict(C=6, N=10, extra_dim=4)}
# delta = C sqrt(N) lam for the flows: two collapsed, one close to the threshold, one past it.
FLOW_DELTAS = (0.1, 0.5, 0.9, 1.3)
PHASE_POINTS = {"quick": 9, "full": 17}
PHASE_RANGE = (0.1, 1.7)  # lam / lam*, avoiding lam = lam* where the flow slows down critically
# The stopping rule: ||grad L|| < FLOW_TOL, or t = FLOW_T_MAX (the slowest mode decays at ~lam). The
# integrator and its tolerances are the library's defaults (ufm.dynamics.DEFAULT_METHOD and its
# default_tolerances(FLOW_TOL)), as for ``ufm flow`` and the sweeps.
FLOW_TOL = 1e-8
FLOW_T_MAX = 1e6
# Relative agreement of the flow's end point with the closed form (loss and eps) that counts as reached.
FLOW_AGREEMENT = AGREEMENT_RTOL

# Columns of flows.csv and phase.csv <- keys of the canonical row (ufm.experiments.compare). The
# report and the figures read these names; the canonical row is the one source of their values.
REPORT_COLUMNS = {
    "delta": "cf_delta", "geometry": "cf_geometry",
    "eps_theory": "cf_eps", "eps_flow": "eps",
    "loss_theory": "cf_loss", "loss_flow": "loss",
    "cos_w_theory": "cf_cos_w", "cos_w_flow": "cos_w",
    "w_row_norm_sq_theory": "cf_w_row_norm_sq", "w_row_norm_sq_flow": "w_row_norm_sq",
    "nc1_flow": "nc1", "nc3_flow": "nc3", "norm_h_sq_flow": "norm_h_sq",
    "grad_norm": "grad_norm", "t_final": "t", "n_grad_evals": "nfev", "method": "method",
    "status": "message", "reached": "reached",
}  # fmt: skip


@dataclass(frozen=True)
class ReproduceResult:
    """What ``reproduce`` wrote.

    Attributes
    ----------
    out : the output directory.
    report : the Markdown report.
    tables : CSV files the report's numbers come from.
    figures : PNG figures.
    proofs_verified, proofs_total : the proof suite's outcome.
    flows_agree : whether every flow reached its closed form (eps and loss to ``FLOW_AGREEMENT``).
    seconds : wall time.
    """

    out: Path
    report: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]
    proofs_verified: int
    proofs_total: int
    flows_agree: bool
    seconds: float

    @property
    def success(self) -> bool:
        return self.proofs_verified == self.proofs_total and self.flows_agree


def _flow_to_closed_form(C: int, N: int, p: int, lam: float, bias: bool, seed: int) -> tuple[dict, dict]:
    """One gradient flow from a random start against the closed form; (summary row, trajectory columns).

    The summary row holds the problem (C, N, p, lam, bias), then ``REPORT_COLUMNS`` built from the
    canonical row of :func:`ufm.experiments.compare.compare_flow`.
    """
    problem = UFMProblem(C, N, lam, lam, bias=bias)
    comparison = compare_flow(problem, p, seed=seed, t_max=FLOW_T_MAX, tol=FLOW_TOL)
    canonical = comparison.row()
    row = {"C": C, "N": N, "p": p, "lam": lam, "bias": bias}
    row |= {column: canonical[key] for column, key in REPORT_COLUMNS.items()}
    res = comparison.flow
    trajectory = {"t": res.t, "loss": res.loss, **{k: res.metrics[k] for k in ("eps", "nc1", "cos_w")}}
    return row, trajectory


def run_flows(
    out: Path, *, quick: bool, seed: int = 0, progress: bool = True
) -> tuple[Path, Path, Path, bool]:
    """Part 2: flows against the closed form; returns (summary CSV, trajectories CSV, figure, all reached)."""
    from tqdm import tqdm

    from .plots import plot_flows

    size = FLOW_SIZES["quick" if quick else "full"]
    C, N = size["C"], size["N"]
    cases = [(d / (C * np.sqrt(N)), bias) for bias in (True, False) for d in FLOW_DELTAS]
    rows, trajectories = [], []
    for i, (lam, bias) in enumerate(tqdm(cases, desc="flows", disable=not progress)):
        p = C + size["extra_dim"]
        row, traj = _flow_to_closed_form(C, N, p, float(lam), bias, seed + i)
        rows.append(row)
        label = f"delta={row['delta']:.2g}, {'bias' if bias else 'no bias'}"
        trajectories += [
            {"run": label, **{k: float(v[j]) for k, v in traj.items()}} for j in range(len(traj["t"]))
        ]
    summary = write_csv(out / "flows.csv", rows)
    traj_path = write_csv(out / "flow_trajectories.csv", trajectories)
    figure = plot_flows(read_csv(traj_path), read_csv(summary), out / "flows.png")
    return summary, traj_path, figure, all(r["reached"] for r in rows)


def run_phase(out: Path, *, quick: bool, seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Part 3: eps and NC1 across the collapse threshold; returns (CSV, figure)."""
    from tqdm import tqdm

    from .plots import plot_phase_diagram

    size = FLOW_SIZES["quick"]
    C, N, p = size["C"], size["N"], size["C"] + size["extra_dim"]
    lam_star = 1.0 / (C * np.sqrt(N))
    ratios = np.linspace(*PHASE_RANGE, PHASE_POINTS["quick" if quick else "full"])
    ratios = ratios[np.abs(ratios - 1) > 0.04]  # critical slowing down at the threshold itself
    rows = []
    for i, r in enumerate(tqdm(ratios, desc="phase diagram", disable=not progress)):
        row, _ = _flow_to_closed_form(C, N, p, float(r * lam_star), True, seed + 100 + i)
        rows.append({"lam_over_lam_star": float(r), **row})
    path = write_csv(out / "phase.csv", rows)
    return path, plot_phase_diagram(read_csv(path), out / "phase.png")


def _fmt(cell, digits: int = 4) -> str:
    """A table cell for the report: floats to ``digits`` significant digits, missing as '-'."""
    if cell is None:
        return "-"
    return f"{cell:.{digits}g}" if isinstance(cell, float) else str(cell)


def _md_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _methods(rows: Sequence[dict]) -> str:
    """The integrators named in a table's ``method`` column, in order of appearance."""
    return ", ".join(dict.fromkeys(str(r["method"]) for r in rows)) or "-"


# proofs.csv keeps each proof's formulas in one cell, LaTeX lines joined as in an align environment.
LATEX_SEPARATOR = r" \\ "


def _formulas_link(row: dict) -> str:
    """The proof table's cell: how many formulas, linked to their LaTeX below the table."""
    n = len(row["latex"].split(LATEX_SEPARATOR)) if row.get("latex") else 0
    return f"[{n} formulas](#formulas-{row['key']})" if n else "-"


def _formulas(proofs: Sequence[dict]) -> str:
    """Each proof's formulas as LaTeX display blocks (sympy.latex of every claim, ``ufm prove --latex``)."""
    parts = ["### Formulas (LaTeX, from `ufm prove --latex`)"]
    for r in proofs:
        if r.get("latex"):
            blocks = "\n".join(f"$$ {f} $$" for f in r["latex"].split(LATEX_SEPARATOR))
            parts.append(f'<a id="formulas-{r["key"]}"></a>**{r["key"]}** ({r["status"]})\n\n{blocks}')
    return "\n\n".join(parts)


def write_report(out: Path, *, quick: bool, seconds: float) -> Path:
    """The Markdown report, built only from the CSV tables in ``out``."""
    from .sgd_noise import sgd_noise_section

    proofs = read_csv(out / "proofs.csv")
    flows = read_csv(out / "flows.csv")
    phase = read_csv(out / "phase.csv")
    network = read_csv(out / "network" / "theory_vs_measurement.csv")
    phases = read_csv(out / "minimizer_phases.csv")
    n_ok = sum(r["status"] == "verified" for r in proofs)
    flow_cols = [
        ("delta", "delta"), ("bias", "bias"), ("geometry", "geometry"),
        ("eps_theory", "eps (theory)"), ("eps_flow", "eps (flow)"),
        ("loss_theory", "loss (theory)"), ("loss_flow", "loss (flow)"),
        ("cos_w_theory", "cos W (theory)"), ("cos_w_flow", "cos W (flow)"),
        ("nc1_flow", "NC1 (flow)"), ("grad_norm", "‖∇L‖"), ("t_final", "t"), ("n_grad_evals", "grad evals"),
    ]  # fmt: skip
    phase_cols = [
        ("lam_over_lam_star", "lam/lam*"), ("delta", "delta"), ("eps_theory", "eps (theory)"),
        ("eps_flow", "eps (flow)"), ("loss_theory", "loss (theory)"), ("loss_flow", "loss (flow)"),
        ("nc1_flow", "NC1 (flow)"), ("cos_w_flow", "cos W (flow)"), ("norm_h_sq_flow", "‖H‖² (flow)"),
    ]  # fmt: skip
    proofs = [r | {"formulas": _formulas_link(r)} for r in proofs]
    net_cols = [(k, k) for k in network[0]] if network else []
    errors = read_csv(out / "network" / "prediction_errors.csv")
    error_cols = [(k, k) for k in errors[0]] if errors else []
    size = FLOW_SIZES["quick" if quick else "full"]
    text = f"""# ufm reproduce: theory against measurement

Mode: {"quick" if quick else "full"}; wall time {seconds:.0f} s. Every number below is read from the CSV
file named with its table, in this directory.

## 1. Proofs ({n_ok}/{len(proofs)} verified; `proofs.csv`)

{_md_table(proofs, [("name", "proof"), ("status", "status"), ("seconds", "seconds"), ("source", "source"), ("formulas", "formulas")])}

{_formulas(proofs)}

## 2. Gradient flow against the closed-form minimizer (`flows.csv`, figure `flows.png`)

UFM with C = {size["C"]}, N = {size["N"]}, lam_W = lam_H = lam, from a random start,
integrated with {_methods(flows)} (the library's default integrator and tolerances) until
‖∇L‖ < {FLOW_TOL:g}. Theory: the closed-form global minimizer (`ufm solve`):
a simplex ETF with a bias, an orthogonal frame without, zero for delta = C sqrt(N) lam >= 1.

{_md_table(flows, flow_cols)}

![flows](flows.png)

## 3. The collapse threshold (`phase.csv`, figure `phase.png`)

With a bias, C = {FLOW_SIZES["quick"]["C"]}, N = {FLOW_SIZES["quick"]["N"]}: collapse happens iff
lam < lam* = 1/(C sqrt(N)); past it the minimizer is zero (eps = 1 - 1/C): the flow's features
shrink to 0 (‖H‖² column), and NC1, a ratio of vanishing quantities, no longer measures collapse.

{_md_table(phase, phase_cols)}

![phase](phase.png)

## 4. A bias-free ReLU network with and without weight decay (`network/theory_vs_measurement.csv`)

The poster's experiment (Figs. 1-2) on the embedded MNIST digits; `*_pred` columns are the theorem's
predictions from the measured eps and lambda (empty without weight decay).

{_md_table(network, net_cols)}

![network](network/nc_weight_decay.png)

### Why the predictions miss (`network/prediction_errors.csv`)

At any point the theorem's errors split exactly into a part that vanishes at a critical point of the
last layer (`*_part_stationarity`) and a part that vanishes under symmetric quasi-interpolation
(`*_part_sqi`); the two parts of the scale and row-norm errors sum to the signed relative error,
and `gram_part_*` are the two parts' sizes in the Gram matrix that sets the cosines
(docs/theory.md §12). `*_bound` bounds each error by `stationarity_residual` and `sqi_residual`
alone (empty where vacuous). "W_L refined" is the same network with its last layer moved to the
limit of full-batch gradient descent (`ufm train --refine-to`, §12.6): what remains there is the
SQI violation alone.

{_md_table(errors, error_cols)}

## 5. Phase diagrams of the literature's minimizers (`minimizer_phases.csv`, `minimizer_phases.png`)

Closed form (`ufm solve`) against gradient flow from a random start: `lam_b` rows sweep the bias decay
(docs/theory.md §6; x = lam_b), `depth` rows the decay at depth L = 1, 2, 3 as a multiple of each
depth's threshold (§7; x = lam/lam_threshold), `minority` rows the decay with counts (6, 3, 1), no
bias (§8; x = lam). `reached`: the flow's end loss agrees with the closed form to 1e-6.

{_md_table(phases, [(k, k) for k in ("diagram", "x", "depth", "regime", "geometry", "loss_theory", "loss_flow", "reached")])}

![minimizer phases](minimizer_phases.png)

{collapse_time_section(out)}

{low_rank_section(out, 7)}

{normalization_section(out, 8)}

{sgd_noise_section(out, 9)}"""
    path = out / "report.md"
    path.write_text(text)
    return path


# Files every run writes (the report and part 1's table): a directory holding them is an earlier run.
RUN_MARKERS = ("report.md", "proofs.csv")


def _check_replaceable(out: Path) -> None:
    """Refuse, before the run, an ``out`` that the finished run must not replace (it replaces its
    directory whole, :func:`_move_into_place`): a file, the current directory or one above it, or a
    directory of other files than an earlier run's (no RUN_MARKERS)."""
    output_directory(out, create=False)
    here = Path.cwd()
    if out.resolve() in (here, *here.parents):
        raise ValueError(
            f"--out {out} is the current directory or holds it, and the run replaces its output directory "
            "whole: name a new directory below it"
        )
    if out.is_dir() and any(out.iterdir()) and not all((out / name).is_file() for name in RUN_MARKERS):
        raise ValueError(
            f"--out {out} holds files that are not an earlier run of ufm reproduce (it has no "
            f"{' and '.join(RUN_MARKERS)}), and the run replaces its output directory whole: name a new "
            "or empty directory, or move those files away"
        )


def _staging(out: Path) -> Path:
    """A fresh directory beside ``out`` for one run (``.NAME.partial-PID``): a run killed midway
    leaves it, never a half-updated ``out``."""
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def _move_into_place(stage: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``stage`` with two renames (the old ``out`` is set aside, then
    removed), so ``out`` holds either the previous run whole or this one whole, never a mix of runs.
    A kill between the renames leaves no ``out`` and the previous run in ``.NAME.old-PID``."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


class _PartLog:
    """``with part(name):`` prints "name ..." when a part starts and "name: done in S s" when it ends,
    on stderr (where the progress bars go), so a person watching sees every part, also those without
    a bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"reproduce: {name} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(
                f"reproduce: {name}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True
            )


def reproduce(
    out: str | Path = "figures", *, quick: bool = False, seed: int = 0, progress: bool = True
) -> ReproduceResult:
    """Run the five parts of the module docstring and write the report into ``out``.

    Parameters
    ----------
    out : output directory. The run is written into a fresh directory beside it and replaces ``out``
        as a whole when complete (files of an earlier run that this one does not write go with it), so
        report.md never sits beside tables of another run. So ``out`` must be new, empty or an earlier
        run (holding RUN_MARKERS); anything else (a file, a directory of other files, the current
        directory) is refused with a ValueError before the run starts.
    quick : smaller sizes and shorter training (58 s measured for ``ufm reproduce --quick`` on 2 idle
        CPU cores on 2026-12-02, 11 s of it the proofs, 8 s the network part; README).
    seed : seed of every random start and of the network's training.
    progress : progress bars on stderr.
    """
    from ..proofs import run_proofs
    from .minimizer_phases import run_minimizer_phases
    from .sgd_noise import NOISE_WDS, sgd_noise_experiment
    from .weight_decay import weight_decay_experiment

    t0 = time.perf_counter()
    _check_replaceable(Path(out))
    final, out = Path(out), _staging(Path(out))
    part = _PartLog(progress)
    with part("1/9 proofs (SymPy)"):
        proofs = run_proofs()
        proofs_csv = write_csv(
            out / "proofs.csv",
            [
                {
                    "key": r.key,
                    "name": r.name,
                    "source": r.source,
                    "status": r.status,
                    "seconds": r.seconds,
                    "latex": LATEX_SEPARATOR.join(r.latex),
                }
                for r in proofs
            ],  # fmt: skip
        )
    with part("2/9 gradient flows against the closed form"):
        flows_csv, traj_csv, flows_png, agree = run_flows(out, quick=quick, seed=seed, progress=progress)
    with part("3/9 phase diagram"):
        phase_csv, phase_png = run_phase(out, quick=quick, seed=seed, progress=progress)
    with part("4/9 network training (the poster's experiment)"):
        exp = weight_decay_experiment(quick=quick, out=out / "network", progress=progress, seed=seed)
    with part("5/9 the literature's minimizers against flow end points"):
        phases_csv, phases_png = run_minimizer_phases(out, quick=quick, seed=seed, progress=progress)
    with part("6/9 time to collapse (moment flows)"):
        collapse_csv, exponents_csv, collapse_png = run_collapse_time(
            out, quick=quick, seed=seed, progress=progress
        )
    with part("7/9 low-rank bias (the singular values of part 4's runs)"):
        low_rank = run_low_rank([(r.config.wd, r.out) for r in exp.results], out)
    with part("8/9 normalization (rho of an MLP and a CNN)"):
        normalization = run_normalization(out, quick=quick, seed=seed, progress=progress)
    with part("9/9 intrinsic SGD noise (part 4's networks continued)"):
        runs = [r.out for r in exp.results if r.config.wd in NOISE_WDS]
        noise = sgd_noise_experiment(runs, quick=quick, out=out, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    write_report(out, quick=quick, seconds=seconds)
    _move_into_place(out, final)
    tables = (
        proofs_csv, flows_csv, traj_csv, phase_csv, out / "network" / "theory_vs_measurement.csv",
        phases_csv, collapse_csv, exponents_csv, low_rank.table, normalization.table, noise.table,
        noise.exponents_table,
    )  # fmt: skip
    extra_figures = (low_rank.figure, normalization.figure, noise.figure)
    return ReproduceResult(
        out=final,
        report=final / "report.md",
        tables=tuple(final / Path(t).relative_to(out) for t in tables),
        figures=tuple(
            final / Path(f).relative_to(out)
            for f in (flows_png, phase_png, exp.figure, phases_png, collapse_png, *extra_figures)
        ),
        proofs_verified=sum(r.status == "verified" for r in proofs),
        proofs_total=len(proofs),
        flows_agree=agree,
        seconds=seconds,
    )
