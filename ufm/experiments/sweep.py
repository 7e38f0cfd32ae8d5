"""Parameter sweeps: a grid of gradient-flow or training runs, on a process pool or a Dask cluster.

A sweep is described by a TOML (or JSON) file::

    kind = "flow"                      # a runner in RUNNERS: "flow" or "train"
    out = "flow_sweep.csv"             # the results table, .csv or .parquet (relative to the file)
    workers = 2                        # optional: local worker processes (default min(2, CPUs))

    [grid]                             # every combination of these lists is one run
    lam_w = [1e-3, 1e-2]
    lam_h = [1e-3, 1e-2]
    bias = [true, false]
    seed = [0, 1]

    [fixed]                            # settings shared by every run
    classes = 4
    per_class = 5
    dim = 6

The keys of ``grid`` and ``fixed`` are the runner's parameters (``RUNNERS[kind].parameters``). A
flow run takes the model flags of ``ufm solve`` and ``ufm flow``: ``per_class`` one count or a list
of C per-class counts, ``lam_w`` one decay or a list of ``depth`` decays (W_1 first, the classifier
last), ``lam_b``, ``depth``, ``loss``; so a grid ``per_class = [5, [8, 4, 2]]`` runs a balanced and
an imbalanced problem. A list-valued setting is written to the table as its comma-separated text
("8,4,2"), the form of the CLI flags. Any other key, a value of the wrong type, or a run that its runner rejects (e.g. ``dim`` below the
minimizer's rank) is a ValueError raised before anything runs.

Every run becomes one row of a tidy table: ``run_id`` (a hash of the run's full configuration, the
defaults included), ``kind``, one column per parameter, ``status`` ("ok" or "failed"), ``error`` (the
exception of a failed run), ``seconds``, then the runner's result columns (one named like a setting
gets the prefix ``final_``). A flow run's results are the canonical row of
:mod:`ufm.experiments.compare` (``final_loss`` is its ``loss``). Rows are appended as runs finish,
so an interrupted sweep loses nothing; running the same sweep again skips the runs already "ok" in
the table and retries the failed ones.

A flow run's integrator settings follow the library's numerical policy: ``method`` defaults to
``ufm.dynamics.DEFAULT_METHOD`` (written into the row and its run_id), and ``rtol``, ``atol``,
``max_nfev``, ``max_seconds`` to None, the integrator's ``default_tolerances(tol)`` and the library's
budgets (a run that spends its budget is an "ok" row with ``flow_status`` 3 or 4).

Execution: a local :class:`concurrent.futures.ProcessPoolExecutor` (processes from a fork server, which
are safe with torch; each runs its libraries' thread pools on its share of the cores, cores // workers
threads, as Dask's nanny runs its workers' on one), or with ``scheduler="tcp://HOST:8786"`` a Dask
distributed cluster. On an HPC batch system start the cluster with ``dask-jobqueue``, e.g.::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=4, memory="16GB", walltime="02:00:00")
    cluster.scale(jobs=10)
    run_sweep("sweep.toml", scheduler=cluster.scheduler_address)

or ``dask scheduler`` plus ``dask worker ADDRESS`` on the nodes. The workers need ``ufm`` installed;
the client (this process) writes the table, so it needs no shared file system.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._threads import limit_process_threads, usable_cores
from .._validation import check_choice, check_positive, check_positive_int
from ..dynamics import DEFAULT_METHOD, METHODS, gradient_flow
from ..model import UFMProblem
from ..tables import TABLE_FORMATS, read_table
from ..training import TrainConfig, train
from .compare import compare_flow
from .store import SweepStore, read_store, sql_type, store_path

__all__ = [
    "MAX_RUNS", "RUNNERS", "Runner", "SweepInterrupted", "SweepResult", "expand_grid", "load_config",
    "read_sweep", "read_table", "run_sweep",
]  # fmt: skip

CONFIG_KEYS = ("kind", "grid", "fixed", "out", "workers")

# Columns every row has, before the parameters; the status columns follow the parameters.
ID_COLUMNS = ("run_id", "kind")
STATUS_COLUMNS = ("status", "error", "seconds")

# A scheduler that is up answers within a second; ten seconds also covers a busy one, and a wrong
# address fails fast instead of hanging on distributed's default of 30 s.
CONNECT_TIMEOUT_S = 10

# Largest grid run_sweep accepts unless told otherwise (ufm sweep --max-runs): a grid is validated
# and its settings held in memory before anything runs.
MAX_RUNS = 10_000

# Runs handed to the pool or cluster at once, per worker: enough to keep every worker busy while
# results come back, few enough that a large grid never queues all its tasks (and their memory).
BATCH_PER_WORKER = 4

# Seconds between a worker's checks that the sweep that started it is still alive; a worker whose
# sweep was killed (SIGKILL leaves no chance to stop it) exits within about this time.
PARENT_POLL_S = 1.0

# Seconds between exports of the table while runs finish (always once more at the end).
EXPORT_INTERVAL_S = 5.0

# Hex digits of sha256 kept in run_id: a collision among 1e6 runs has probability ~1e-8.
RUN_ID_DIGITS = 16

# The last lines of a failed run's traceback kept in its ``error`` column (where it failed, not the
# whole call stack of the worker).
ERROR_TRACEBACK_LINES = 3


# ----------------------------------------------------------------------------------------------------
# Runners: settings dict -> flat dict of scalar results. Top-level functions, so workers can unpickle them.


@dataclass(frozen=True)
class Runner:
    """One kind of run a sweep can grid over.

    Attributes
    ----------
    run : callable(settings dict) -> dict of str -> scalar (None, bool, int, float or str)
        A top-level (picklable) function: it is shipped to worker processes by reference.
    parameters : dict of str -> (types, default)
        Every setting ``run`` accepts, the Python types its value may have and its default.
    check : callable(settings dict) -> None
        Raises ValueError for a run that cannot succeed; called on every run before any runs.
    """

    run: Callable[[dict[str, Any]], dict[str, Any]]
    parameters: Mapping[str, tuple[tuple[type, ...], Any]]
    check: Callable[[dict[str, Any]], None]


# Flow runs: the plain or deep UFM (ufm.model.UFMProblem), from a seeded random start to its end,
# against the closed form: ufm.experiments.compare.compare_flow. The numerical policy is the library's:
# method defaults to ufm.dynamics.DEFAULT_METHOD (resolved here, so the table and run_id name the
# integrator used), and rtol, atol, max_nfev, max_seconds default to None, which gradient_flow reads
# as the integrator's default_tolerances(tol) and the library's budgets.
_FLOW_DEFAULTS = inspect.signature(gradient_flow).parameters
FLOW_OPTIONS = ("method", "t_max", "tol", "rtol", "atol", "max_nfev", "max_seconds")
FLOW_PARAMETERS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "classes": ((int,), 4),
    "per_class": ((int, tuple[int, ...]), 5),
    "dim": ((int,), 4),
    "lam_w": ((float, tuple[float, ...]), 1e-3),
    "lam_h": ((float,), 1e-3),
    "lam_b": ((float,), 0.0),
    "bias": ((bool,), True),
    "loss": ((str,), "mse"),
    "label_smoothing": ((float,), 0.0),
    "depth": ((int,), 1),
    "activation": ((str,), "linear"),
    "init_scale": ((float,), 1.0),
    "seed": ((int,), 0),
    "method": ((str,), DEFAULT_METHOD),
    **{name: ((float,), _FLOW_DEFAULTS[name].default) for name in ("t_max", "tol")},
    "rtol": ((float, type(None)), None),
    "atol": ((float, type(None)), None),
    "max_nfev": ((int, type(None)), None),
    "max_seconds": ((float, type(None)), None),
}  # fmt: skip


def _flow_problem(settings: dict[str, Any]) -> UFMProblem:
    s = settings
    if not s["bias"] and s["lam_b"]:
        raise ValueError(f"lam_b = {s['lam_b']:g} is the decay of a bias, but bias = false removes it")
    return UFMProblem(
        s["classes"], s["per_class"], s["lam_w"], s["lam_h"], lam_b=s["lam_b"], bias=s["bias"],
        loss=s["loss"], depth=s["depth"], activation=s["activation"], label_smoothing=s["label_smoothing"],
    )  # fmt: skip


def _check_flow(settings: dict[str, Any]) -> None:
    problem = _flow_problem(settings)
    check_choice("method", settings["method"], METHODS)
    min_dim = problem.C - 1 if problem.bias else problem.C  # the rank of the depth-1 minimizers
    if settings["dim"] < min_dim:
        raise ValueError(
            f"dim = {settings['dim']} is below {min_dim} ({'C-1' if problem.bias else 'C'}), the minimizer's rank"
        )
    for name in ("t_max", "tol", "rtol", "atol", "max_seconds", "init_scale"):
        if settings[name] is not None:
            check_positive(name, settings[name])
    if settings["max_nfev"] is not None:
        check_positive_int("max_nfev", settings["max_nfev"])


def run_flow(settings: dict[str, Any]) -> dict[str, Any]:
    """One gradient flow of the UFM, measured at its end and set beside the closed form.

    Parameters
    ----------
    settings : dict with the keys of ``FLOW_PARAMETERS``: the problem (classes C, per_class N, dim p,
        lam_w, lam_h, bias, loss, label_smoothing, depth, activation), the start (init_scale, seed:
        ``UFMParams.random``) and the integrator (``FLOW_OPTIONS``: method, t_max, tol, rtol, atol,
        max_nfev, max_seconds of ``gradient_flow``; None is the library's default).

    Returns
    -------
    dict
        The canonical row of :func:`ufm.experiments.compare.compare_flow` without ``method`` (the
        setting column holds the integrator used): the flow (``t``, ``grad_norm``, ``nfev``,
        ``success``, ``flow_status``, ``message``), its end point (``loss``, which the table shows as
        ``final_loss`` since the setting ``loss`` names the loss function, ``eps``, ``cos_w``,
        ``cos_h``, ``nc1``, ``nc2_*``, ``nc3``, ``nc4``, norms), the closed form (``cf_eps``,
        ``cf_loss``, ``cf_cos_w``, ``cf_cos_h``, ``cf_w_row_norm_sq``, ``cf_geometry``, ``cf_delta``)
        and the gaps (``eps_err``, ``loss_rel_err``, ``reached``); the ``cf_*`` and gap columns are
        None where the model has no closed form, and ``closed_form_note`` says why.
    """
    comparison = compare_flow(
        _flow_problem(settings), settings["dim"], seed=settings["seed"], init_scale=settings["init_scale"],
        metrics=False, n_records=2, **{k: settings[k] for k in FLOW_OPTIONS},
    )  # fmt: skip
    row = comparison.row()
    del row["method"]  # the setting (DEFAULT_METHOD when not given) is the integrator used
    return row


def _train_parameters() -> dict[str, tuple[tuple[type, ...], Any]]:
    """The fields of ufm.training.TrainConfig with their annotated types and defaults."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        types = typing.get_args(hints[f.name]) or (hints[f.name],)
        out[f.name] = (tuple(types), f.default)
    return out


def _check_train(settings: dict[str, Any]) -> None:
    TrainConfig(**settings)


def run_train(settings: dict[str, Any]) -> dict[str, Any]:
    """One network training run (:func:`ufm.training.train`), reduced to its last measurement.

    Parameters
    ----------
    settings : dict with the fields of :class:`ufm.training.TrainConfig`.

    Returns
    -------
    dict
        ``TrainResult.final`` (the last measured epoch: losses, accuracies, NC1-NC4, eps, norms, ranks,
        the theorem's predictions beside the measurements, SGD-noise measures; ``lr`` becomes
        ``final_lr``, the schedule's last value) plus ``success``,
        ``train_status``, ``message``, ``nsteps`` and ``wall_s``.
    """
    result = train(TrainConfig(**settings), progress=False)
    return dict(result.final) | {
        "success": result.success,
        "train_status": result.status,
        "message": result.message,
        "nsteps": result.nsteps,
        "wall_s": result.wall_s,
    }


RUNNERS: dict[str, Runner] = {
    "flow": Runner(run_flow, FLOW_PARAMETERS, _check_flow),
    "train": Runner(run_train, _train_parameters(), _check_train),
}


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class _Plan:
    kind: str
    runs: list[dict[str, Any]]  # full settings of each run, defaults included, in grid order
    run_ids: list[str]
    out: Path
    workers: int


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Read a sweep configuration (TOML or JSON file, or an already parsed dict).

    Returns the dict and the directory that a relative ``out`` is taken from (the file's directory, or
    the working directory for a dict).
    """
    if isinstance(config, Mapping):
        return dict(config), Path.cwd()
    path = Path(config)
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the configuration must be a table/object, got {type(data).__name__}")
    return data, path.resolve().parent


def _coerce(where: str, value: Any, types: tuple[Any, ...]) -> Any:
    """``value`` as one of ``types``: an int is accepted for a float (so 1 and 1.0 hash alike); a
    list for ``tuple[T, ...]`` becomes a tuple of T (per-class counts, per-layer decays)."""
    if value is None and type(None) in types:
        return None
    sequences = [t for t in types if typing.get_origin(t) is tuple]
    if isinstance(value, list | tuple) and sequences:
        item = (typing.get_args(sequences[0])[0],)
        return tuple(_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value))
    if isinstance(value, bool):
        if bool in types:
            return value
    elif isinstance(value, int) and int in types:
        return value
    elif isinstance(value, int | float) and float in types:
        return float(value)
    elif isinstance(value, str) and str in types:
        return value
    names = " or ".join(
        "null" if t is type(None) else f"a list of {typing.get_args(t)[0].__name__}" if t in sequences
        else t.__name__ for t in types
    )  # fmt: skip
    raise ValueError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def expand_grid(config: Mapping[str, Any], *, max_runs: int = MAX_RUNS) -> list[dict[str, Any]]:
    """The full settings of every run of a sweep configuration, in grid order (last key fastest).

    Checks the configuration's keys, the grid's and fixed settings' names and types against
    ``RUNNERS[kind].parameters``, and every run with the runner's ``check``; raises a ValueError naming
    the first problem. An empty grid, and one of more than ``max_runs`` runs, are refused before any
    run is built.
    """
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"unknown configuration key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(CONFIG_KEYS)}"
        )
    if "kind" not in config:
        raise ValueError(f"the configuration needs 'kind', one of {', '.join(map(repr, RUNNERS))}")
    kind = check_choice("kind", config["kind"], RUNNERS)
    runner = RUNNERS[kind]
    grid, fixed = config.get("grid", {}), config.get("fixed", {})
    for name, table in (("grid", grid), ("fixed", fixed)):
        if not isinstance(table, Mapping):
            raise ValueError(f"'{name}' must be a table of settings, got {table!r}")
        bad = sorted(set(table) - set(runner.parameters))
        if bad:
            raise ValueError(
                f"unknown {kind} parameter(s) in '{name}': {', '.join(map(repr, bad))}; "
                f"valid: {', '.join(runner.parameters)}"
            )
    both = sorted(set(grid) & set(fixed))
    if both:
        raise ValueError(f"parameter(s) {', '.join(map(repr, both))} appear in both 'grid' and 'fixed'")
    base = {name: default for name, (_, default) in runner.parameters.items()}
    for name, value in fixed.items():
        base[name] = _coerce(f"fixed.{name}", value, runner.parameters[name][0])
    if not grid:
        raise ValueError(
            "the configuration's [grid] is empty: give each setting to vary a list of values "
            "(a single run is a grid of one value, e.g. seed = [0])"
        )
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{name} must be a non-empty list of values, got {values!r}")
    # Counted before any run is built: a grid of 10^6 runs is refused, not expanded into memory.
    n_runs = math.prod(len(values) for values in grid.values())
    if n_runs > max_runs:
        raise ValueError(
            f"the grid has {n_runs} runs ({' x '.join(str(len(v)) for v in grid.values())}), more than "
            f"max_runs = {max_runs}; shrink the grid or raise the limit (ufm sweep --max-runs)"
        )
    axes = []
    for name, values in grid.items():
        coerced = [_coerce(f"grid.{name}[{i}]", v, runner.parameters[name][0]) for i, v in enumerate(values)]
        if len({json.dumps(v) for v in coerced}) < len(coerced):
            raise ValueError(f"grid.{name} repeats a value: {values!r}")
        axes.append([(name, v) for v in coerced])
    runs = [base | dict(combo) for combo in itertools.product(*axes)]
    for settings in runs:
        try:
            runner.check(settings)
        except ValueError as err:
            shown = ", ".join(f"{k}={settings[k]!r}" for k in grid) or "the fixed settings"
            raise ValueError(f"bad {kind} run ({shown}): {err}") from None
    return runs


def run_id(kind: str, settings: Mapping[str, Any]) -> str:
    """Stable identity of a run: sha256 of its kind and full settings as canonical JSON."""
    text = json.dumps({"kind": kind, "settings": dict(settings)}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:RUN_ID_DIGITS]


def _setting_cells(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings as table cells: a list-valued one (per-class counts, per-layer decays) as its
    comma-separated text, the form of the CLI flags ("8,4,2")."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in settings.items()}


def _check_parquet_columns(runs: list[dict[str, Any]]) -> None:
    """A Parquet column holds one type: refuse, before anything runs, a grid that mixes them."""
    for name in runs[0] if runs else ():
        kinds = {type(v).__name__ for v in (_setting_cells(r)[name] for r in runs) if v is not None}
        if len(kinds) > 1:
            raise ValueError(
                f"setting {name!r} mixes {' and '.join(sorted(kinds))} values, which one Parquet column "
                "cannot hold; use a .csv table, or give every value in the same form"
            )


def _plan(config, workers: int | None, max_runs: int) -> _Plan:
    data, root = load_config(config)
    runs = expand_grid(data, max_runs=check_positive_int("max_runs", max_runs))
    kind = data["kind"]
    if "out" not in data or not isinstance(data["out"], str):
        raise ValueError(
            f"the configuration needs 'out', the path of the results table ({' or '.join(TABLE_FORMATS)})"
        )
    out = root / Path(data["out"]).expanduser()
    check_choice("table format (suffix of 'out')", out.suffix, TABLE_FORMATS)
    if out.suffix == ".parquet":
        _check_parquet_columns(runs)
    if workers is None:
        workers = data.get("workers", min(2, os.cpu_count() or 1))
    workers = check_positive_int("workers", workers)
    return _Plan(kind, runs, [run_id(kind, s) for s in runs], out, workers)


# ----------------------------------------------------------------------------------------------------
# Execution


def _scalar(key: str, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # A table cell never holds NaN: an undefined measurement is an empty cell (None).
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):  # per-class results (imbalanced counts): "0.5,0.25,0.1"
        return ",".join(str(_scalar(key, v)) for v in value)
    raise TypeError(f"result {key!r} is a {type(value).__name__}, not a scalar")


def _execute(run: Callable[[dict[str, Any]], dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration on a worker; an exception becomes a failed row instead of a lost task."""
    t0 = time.perf_counter()
    try:
        # A result named like a setting is its value at the end (the flow's loss value beside the
        # setting loss = "mse", the schedule's last lr beside the initial lr): prefix it.
        results = {
            (f"final_{k}" if k in settings else k): _scalar(k, v) for k, v in run(dict(settings)).items()
        }
        clash = sorted(set(results) & {*ID_COLUMNS, *STATUS_COLUMNS})
        if clash:
            raise ValueError(f"the runner returned result(s) named like table columns: {', '.join(clash)}")
        status, error = "ok", None
    except Exception as err:
        results, status = {}, "failed"
        error = _describe(err)
    return {"status": status, "error": error, "seconds": time.perf_counter() - t0} | results


def _describe(err: BaseException) -> str:
    where = traceback.format_tb(err.__traceback__)[-ERROR_TRACEBACK_LINES:] if err.__traceback__ else []
    last = where[-1].strip().splitlines()[0] if where else ""
    return f"{type(err).__name__}: {err}" + (f" [{last}]" if last else "")


@dataclass(frozen=True)
class SweepResult:
    """Outcome of :func:`run_sweep`.

    Attributes
    ----------
    table : Path of the results table (it also holds rows of earlier sweeps into the same file).
    n_total : runs in the grid.
    n_done : runs that ran now and succeeded.
    n_skipped : runs already "ok" in the table, not run again.
    n_failed : runs that ran now and failed (their rows hold the error).
    rows : this grid's rows of the table, in grid order.
    """

    table: Path
    n_total: int
    n_done: int
    n_skipped: int
    n_failed: int
    rows: list[dict[str, Any]]

    @property
    def success(self) -> bool:
        """True when every run of the grid is "ok" in the table."""
        return self.n_done + self.n_skipped == self.n_total


def _connect(address: str):
    from dask.distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except OSError as err:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address!r}: {err}") from None


def run_sweep(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    max_runs: int = MAX_RUNS,
) -> SweepResult:
    """Run every combination of a sweep configuration (module docstring) into one results table.

    Parameters
    ----------
    config : path of a TOML/JSON file, or the parsed dict (a relative ``out`` is then relative to the
        working directory).
    scheduler : address of a Dask distributed scheduler (``tcp://HOST:PORT``); default: a local
        process pool. An unreachable address raises ConnectionError after CONNECT_TIMEOUT_S seconds.
    workers : local worker processes (default: the config's ``workers``, else min(2, CPUs)); ignored
        with a scheduler, whose cluster decides.
    progress : show a tqdm bar on stderr.
    max_runs : the largest grid accepted (default MAX_RUNS); a larger one is a ValueError.

    Returns
    -------
    SweepResult

    Raises
    ------
    SweepInterrupted
        On SIGINT or SIGTERM (in the main thread): the workers are stopped, the finished runs are
        in the store and the table, and running the sweep again resumes.

    Notes
    -----
    The whole grid is validated before anything runs. The rows live in the SQLite store beside the
    table (:mod:`ufm.experiments.store`), one transaction per finished run; the table is exported
    from it. Runs whose ``run_id`` is "ok" in the store are skipped, also when another sweep on the
    same store finishes them meanwhile; failed ones are run again and their rows replaced. A run that
    raises is recorded with ``status = "failed"`` and its error while the others go on.
    """
    from contextlib import ExitStack, closing

    from tqdm.auto import tqdm

    plan = _plan(config, workers, max_runs)
    runner = RUNNERS[plan.kind]
    with ExitStack() as stack:
        store = stack.enter_context(_open_store(plan, runner))
        done = store.done()
        todo = [i for i, rid in enumerate(plan.run_ids) if rid not in done]
        # Connect before running anything, so a wrong address fails fast.
        client = stack.enter_context(_connect(scheduler)) if scheduler is not None and todo else None
        stack.enter_context(_signals_interrupt())
        bar = stack.enter_context(
            tqdm(
                total=len(todo), desc=f"sweep {plan.kind}", unit="run", file=sys.stderr, disable=not progress
            )
        )
        exporter = stack.enter_context(_Exporter(store, plan.out))

        def still_todo(i: int) -> bool:  # another sweep on this store may have finished it meanwhile
            return plan.run_ids[i] not in store.done()

        # closing(): an interruption (Ctrl-C, SIGTERM) stops the pool or cancels the Dask tasks at once.
        run = _run_dask if client else _run_pool
        finished = stack.enter_context(closing(run(client, runner, plan, todo, still_todo)))
        counts = {"ok": 0, "failed": 0}
        for i, outcome in finished:
            if store.put(
                {"run_id": plan.run_ids[i], "kind": plan.kind, **_setting_cells(plan.runs[i]), **outcome}
            ):
                counts[outcome["status"]] += 1
            bar.update()
            bar.set_postfix(failed=counts["failed"])
            exporter.maybe()
        by_id = {r["run_id"]: r for r in store.rows()}
    n_ok = sum(by_id.get(rid, {}).get("status") == "ok" for rid in plan.run_ids)
    return SweepResult(
        plan.out,
        n_total=len(plan.runs),
        n_done=counts["ok"],
        n_skipped=n_ok - counts["ok"],  # ok before this sweep, or finished by another one meanwhile
        n_failed=counts["failed"],
        rows=[by_id[rid] for rid in plan.run_ids if rid in by_id],
    )


def read_sweep(table: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of the store behind a sweep table (``out`` of its configuration), in the order
    written, each value in its column's declared type: ids are exact strings, booleans bools.

    ``ufm.tables.read_table`` reads the exported table instead, where a CSV cell carries no type.
    """
    return read_store(store_path(table))


class SweepInterrupted(Exception):
    """A sweep stopped by SIGINT or SIGTERM; ``signal`` names it (its workers are stopped)."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal}")


@contextmanager
def _signals_interrupt():
    """SIGINT and SIGTERM raise SweepInterrupted while the sweep runs (main thread only: elsewhere
    Python cannot install handlers, and the caller owns the signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise SweepInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _open_store(plan: _Plan, runner: Runner):
    """The store of the plan's table, created from the table of an older version if there is one."""
    leading = {c: "TEXT" for c in ID_COLUMNS}
    leading |= {name: sql_type(types) for name, (types, _) in runner.parameters.items()}
    leading |= {"status": "TEXT", "error": "TEXT", "seconds": "REAL"}
    path = store_path(plan.out)
    legacy = not path.exists() and plan.out.exists()
    with SweepStore(path, plan.kind, leading) as store:
        if legacy:
            store.import_table(plan.out, ID_COLUMNS)
        yield store


class _Exporter:
    """Exports the store to the table now and then while runs finish, and once more at the end
    (also after an interruption, so the table holds every finished run)."""

    def __init__(self, store: SweepStore, table: Path):
        self.store, self.table, self.last = store, table, time.monotonic()

    def __enter__(self) -> _Exporter:
        self.store.export(self.table)  # at once: a missing or torn table is written whole again
        return self

    def maybe(self) -> None:
        if time.monotonic() - self.last >= EXPORT_INTERVAL_S:
            self.store.export(self.table)
            self.last = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.store.export(self.table)


def _lost(err: BaseException) -> dict[str, Any]:
    """The row of a run whose worker died (the task itself never returned)."""
    return {"status": "failed", "error": f"worker lost: {_describe(err)}", "seconds": None}


def _worker_context():
    """Start method of the local workers: forkserver where available, else spawn.

    Not fork: a forked child inherits the caller's threads (tqdm, Dask, torch's pools) and their locks
    in an unknown state. The fork server is a clean process started once per session with ufm already
    imported, so each pool's workers start in milliseconds instead of re-importing NumPy and SymPy.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _init_worker(sweep_pid: int, threads: int) -> None:
    """Start of every local worker: its libraries' thread pools on ``threads`` threads (its share of
    the cores, ``ufm._threads.limit_process_threads``), ignore SIGINT (the sweep stops its workers
    itself; a Ctrl-C reaches the whole process group) and exit when the sweep that started it is gone."""
    limit_process_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            # The fork server (our parent) exits with the sweep, which may linger as a zombie.
            if os.getppid() != ppid or not _running(sweep_pid):
                os._exit(1)

    threading.Thread(target=watch, name="ufm-sweep-parent-watch", daemon=True).start()


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, exited but not yet reaped by its
    parent, counts as exited; Linux's /proc tells, elsewhere only existence is checked)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _run_pool(
    client, runner: Runner, plan: _Plan, todo: list[int], still_todo: Callable[[int], bool]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (run index, outcome) as the runs finish on a local process pool, at most
    BATCH_PER_WORKER runs per worker in flight."""
    from concurrent.futures import FIRST_COMPLETED, wait

    if not todo:
        return
    pool = ProcessPoolExecutor(
        max_workers=plan.workers,
        mp_context=_worker_context(),
        initializer=_init_worker,
        initargs=(os.getpid(), max(1, usable_cores() // plan.workers)),
    )
    pending = (i for i in todo if still_todo(i))
    running: dict[Any, int] = {}
    try:
        while True:
            for i in itertools.islice(pending, BATCH_PER_WORKER * plan.workers - len(running)):
                running[pool.submit(_execute, runner.run, plan.runs[i])] = i
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    outcome = fut.result()
                except Exception as err:  # BrokenProcessPool: the worker crashed or was killed
                    outcome = _lost(err)
                yield running.pop(fut), outcome
    except BaseException:
        # Interrupted (SIGINT, SIGTERM, closing()): stop the running tasks now instead of waiting for
        # them. ProcessPoolExecutor has no public way to (terminate_workers() is Python 3.14).
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_dask(
    client, runner: Runner, plan: _Plan, todo: list[int], still_todo: Callable[[int], bool]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (run index, outcome) as the runs finish on the Dask cluster behind ``client``, at most
    BATCH_PER_WORKER runs per cluster thread (at least per local worker count) in flight."""
    from dask.distributed import as_completed

    limit = BATCH_PER_WORKER * max(plan.workers, sum(client.nthreads().values()))
    pending = (i for i in todo if still_todo(i))
    running: dict[Any, int] = {}

    def submit(n: int) -> None:
        for i in itertools.islice(pending, n):
            key = f"ufm-sweep-{plan.run_ids[i]}"
            fut = client.submit(_execute, runner.run, plan.runs[i], key=key, pure=False)
            running[fut] = i
            queue.add(fut)

    queue = as_completed()
    try:
        submit(limit)
        for fut in queue:
            try:
                outcome = fut.result()
            except Exception as err:  # KilledWorker and the like: the task never returned
                outcome = _lost(err)
            yield running.pop(fut), outcome
            submit(limit - len(running))
    finally:
        client.cancel(list(running))
