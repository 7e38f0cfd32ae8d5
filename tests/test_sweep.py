"""Sweeps (ufm.experiments.sweep): grid expansion and validation, the results table, failures, resumption, Dask.

The sweep mechanics (failures, resumption, CLI) are tested with a toy runner whose result has an
exact answer (y = x^2) and which leaves one marker file per call, so calls are counted across worker
processes. The flow sweep is checked against the closed-form minimizer typed out here (docs/theory.md
§5), on a local process pool and on a real Dask LocalCluster.
"""

from __future__ import annotations

import json
import math
import re
import socket
import uuid
from pathlib import Path

import pytest

from ufm.cli import main
from ufm.experiments import sweep
from ufm.experiments.store import store_path
from ufm.experiments.sweep import RUNNERS, Runner, expand_grid, run_sweep
from ufm.tables import read_table

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep_flow.toml"

# The flow is integrated to stationarity; its end point must match the closed form to this
# (issue 5 promises 1e-6 for eps, loss and cosines).
FLOW_RTOL = 1e-6


def toy_run(settings: dict) -> dict:
    """y = x^2; a negative x raises. Leaves a marker file per call in the directory ``log``."""
    (Path(settings["log"]) / uuid.uuid4().hex).touch()
    if settings["x"] < 0:
        raise ArithmeticError(f"negative x = {settings['x']}")
    return {"y": settings["x"] ** 2, "label": f"x={settings['x']:g}", "even": settings["x"] % 2 == 0}


def toy_check(settings: dict) -> None:
    if math.isnan(settings["x"]):
        raise ValueError("x is NaN")


def threads_run(settings: dict) -> dict:
    """The thread counts a worker's libraries run on: torch's, and the most of any BLAS or OpenMP
    pool loaded (threadpoolctl's reading), after a NumPy product has started NumPy's pool."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_info

    from ufm.training import _overlap_possible

    np.ones((64, 64)) @ np.ones((64, 64))
    pools = max(i["num_threads"] for i in threadpool_info())
    return {"torch": torch.get_num_threads(), "pools": pools, "overlap": _overlap_possible()}


def test_local_workers_share_the_cores(monkeypatch, tmp_path):
    """Two local workers on a machine of k >= 2 cores run every library on k // 2 threads each, not
    k (with both on 2 cores a flow run took 1.7-17 s instead of 0.4-0.6 s, docs/theory.md §13.3);
    and training measures in line, not on a second thread that would take another worker's core."""
    from ufm._threads import usable_cores

    if usable_cores() < 2:
        pytest.skip("one core: every pool has one thread anyway")
    monkeypatch.setitem(RUNNERS, "threads", Runner(threads_run, {"i": ((int,), 0)}, lambda settings: None))
    config = {"kind": "threads", "grid": {"i": [0, 1, 2, 3]}, "out": str(tmp_path / "threads.csv")}
    res = run_sweep(config, workers=2, progress=False)
    rows = read_table(res.table)
    assert [r["status"] for r in rows] == ["ok"] * 4
    share = usable_cores() // 2
    assert {(r["torch"], r["pools"], r["overlap"]) for r in rows} == {(share, share, False)}


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """Register the toy runner as kind "toy"; returns a config factory and a call counter."""
    log = tmp_path / "calls"
    log.mkdir()
    monkeypatch.setitem(
        RUNNERS, "toy", Runner(toy_run, {"x": ((float,), 0.0), "log": ((str,), "")}, toy_check)
    )

    def config(xs, out="toy.csv"):
        return {"kind": "toy", "grid": {"x": xs}, "fixed": {"log": str(log)}, "out": str(tmp_path / out)}

    return config, lambda: len(list(log.iterdir()))


def test_failed_run_is_recorded_and_the_others_finish(toy):
    config, calls = toy
    res = run_sweep(config([-1.0, 1.0, 2.0, 3.0]), workers=2, progress=False)
    assert (res.n_total, res.n_done, res.n_failed, res.n_skipped) == (4, 3, 1, 0)
    assert not res.success
    assert calls() == 4
    rows = {r["x"]: r for r in read_table(res.table)}
    assert rows[-1.0]["status"] == "failed"
    assert rows[-1.0]["error"].startswith("ArithmeticError: negative x = -1.0")
    assert rows[-1.0]["y"] is None
    for x in (1.0, 2.0, 3.0):
        assert rows[x]["status"] == "ok" and rows[x]["error"] is None
        assert rows[x]["y"] == x**2 and rows[x]["even"] is (x % 2 == 0)
        assert rows[x]["seconds"] >= 0


def test_rerun_skips_finished_runs_and_retries_failed_ones(toy):
    config, calls = toy
    first = run_sweep(config([-1.0, 1.0, 2.0]), workers=1, progress=False)
    assert calls() == 3
    again = run_sweep(config([-1.0, 1.0, 2.0]), workers=1, progress=False)
    assert (again.n_skipped, again.n_done, again.n_failed) == (2, 0, 1)
    assert calls() == 4  # only the failed run ran again
    rows = read_table(first.table)
    assert len(rows) == 3  # the retried run's old row was replaced, not duplicated
    assert {r["run_id"] for r in rows} == {r["run_id"] for r in first.rows}
    # A wider grid runs only the new point.
    wider = run_sweep(config([-1.0, 1.0, 2.0, 5.0]), workers=1, progress=False)
    assert (wider.n_skipped, wider.n_done, wider.n_failed) == (2, 1, 1)
    assert calls() == 6


@pytest.mark.parametrize(
    "ids", [("80890291e0033491", "1e10000000000000"), ("0123456789012345", "9999999999999999")]
)
def test_run_ids_that_look_like_numbers_are_read_back_as_ids(toy, monkeypatch, ids):
    """A hex run id such as "80890291e0033491" parses as the float inf, an all-digit one as an int:
    read back as numbers, finished runs were never seen as done, and every re-run appended duplicates
    (3 sweeps of 4 runs gave 10 rows). The ids are forced here; a re-run must skip both runs."""
    config, calls = toy
    by_x = dict(zip((1.0, 2.0), ids))
    monkeypatch.setattr(sweep, "run_id", lambda kind, settings: by_x[settings["x"]])
    for _ in range(3):
        run_sweep(config([1.0, 2.0]), workers=1, progress=False)
    rows = read_table(config([1.0, 2.0])["out"], ("run_id",))
    assert sorted(r["run_id"] for r in rows) == sorted(ids)
    assert calls() == 2


def test_a_torn_or_deleted_table_is_exported_again_from_the_store(toy):
    """The rows live in the store; the table is only its export. A table cut mid-row (a crash or a full
    disk while exporting) or deleted neither blocks nor re-runs anything: the next sweep writes it whole."""
    config, calls = toy
    res = run_sweep(config([1.0, 2.0, 3.0]), workers=1, progress=False)
    text = res.table.read_text()
    assert len(text.splitlines()) == 4  # header + 3 rows
    res.table.write_text(text[: len(text) * 2 // 3])  # cut inside a row
    resumed = run_sweep(config([1.0, 2.0, 3.0]), workers=1, progress=False)
    assert (resumed.n_skipped, resumed.n_done) == (3, 0) and calls() == 3
    assert res.table.read_text() == text
    res.table.unlink()
    run_sweep(config([1.0, 2.0, 3.0]), workers=1, progress=False)
    assert res.table.read_text() == text and calls() == 3


def test_a_store_that_cannot_be_opened_is_an_error_before_any_run(toy):
    """The store lies beside the table; where SQLite cannot make it (here a directory of its name; a
    read-only directory or /proc alike) the sweep is a ValueError naming it, before any run (before:
    sqlite3.OperationalError's traceback)."""
    config, calls = toy
    cfg = config([1.0, 2.0])
    store = store_path(Path(cfg["out"]))
    store.mkdir()
    with pytest.raises(
        ValueError, match=rf"^cannot open the sweep store {re.escape(str(store))} .*choose another"
    ):
        run_sweep(cfg, workers=1, progress=False)
    assert calls() == 0


def test_run_id_is_stable_and_depends_on_every_setting():
    base = {"kind": "flow", "fixed": {"classes": 3, "dim": 3}, "out": "t.csv"}
    a = expand_grid(base | {"grid": {"lam_w": [1, 2]}})  # ints are floats for lam_w: same runs as 1.0, 2.0
    b = expand_grid(base | {"grid": {"lam_w": [1.0, 2.0]}})
    assert a == b
    assert sweep.run_id("flow", a[0]) == sweep.run_id("flow", b[0])
    assert sweep.run_id("flow", a[0]) != sweep.run_id("flow", a[1])
    assert sweep.run_id("flow", a[0]) != sweep.run_id("train", a[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown configuration key(s) 'colour'"),
        ({"kind": "ode"}, "unknown kind 'ode'"),
        ({"grid": {"lam": [1.0]}}, "unknown flow parameter(s) in 'grid': 'lam'"),
        ({"fixed": {"classes": 3, "width": 8}}, "unknown flow parameter(s) in 'fixed': 'width'"),
        ({"grid": {"lam_w": [0.1, "big"]}}, "grid.lam_w[1] must be float"),
        ({"grid": {"bias": [1]}}, "grid.bias[0] must be bool"),
        ({"grid": {"lam_w": 0.1}}, "grid.lam_w must be a non-empty list"),
        ({"grid": {"lam_w": [0.1, 0.1]}}, "grid.lam_w repeats a value"),
        ({"grid": {"lam_w": [0.1, -1.0]}}, "bad flow run (lam_w=-1.0): lam_w must be a finite number >= 0"),
        ({"grid": {"dim": [1]}}, "dim = 1 is below 2 (C-1)"),
        ({"grid": {"method": ["Euler"]}}, "unknown method 'Euler'"),
        ({"grid": {"rtol": [1e-6, -1.0]}}, "rtol must be a finite number > 0, got -1.0"),
        ({"grid": {"max_nfev": [0]}}, "max_nfev must be an integer >= 1, got 0"),
        ({"grid": {"max_seconds": [0.0]}}, "max_seconds must be a finite number > 0"),
        ({"grid": {"loss": ["hinge"]}}, "unknown loss 'hinge'"),
        ({"grid": {"classes": [3]}, "fixed": {"classes": 3}}, "appear in both 'grid' and 'fixed'"),
        ({"out": "table.xlsx"}, "unknown table format"),
        ({"workers": 0}, "workers must be an integer >= 1"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_problem(tmp_path, change, message):
    config = {
        "kind": "flow",
        "grid": {"lam_w": [0.1]},
        "fixed": {"classes": 3},
        "out": str(tmp_path / "t.csv"),
    }
    with pytest.raises(ValueError) as info:
        run_sweep(config | change, progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "t.csv").exists()  # nothing ran, nothing was written


def test_train_grid_is_checked_against_train_config(tmp_path):
    config = {"kind": "train", "grid": {"wd": [0.0, 5e-3], "depth": [2, 0]}, "out": str(tmp_path / "t.csv")}
    with pytest.raises(ValueError, match=r"depth must be an integer >= 1, got 0"):
        run_sweep(config, progress=False)
    with pytest.raises(ValueError, match=r"unknown train parameter\(s\) in 'grid': 'method'"):
        run_sweep(config | {"grid": {"method": ["sgd"]}}, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_a_clear_error(toy, monkeypatch):
    config, calls = toy
    monkeypatch.setattr(sweep, "CONNECT_TIMEOUT_S", 1)
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:"):
        run_sweep(config([1.0]), scheduler=address, progress=False)
    assert calls() == 0
    assert not Path(config([1.0])["out"]).exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_store_and_export_round_trip_keep_values_and_types(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    from ufm.experiments.store import SweepStore

    path = tmp_path / f"t{suffix}"
    rows = [
        {"run_id": "80890291e0033491", "kind": "toy", "status": "ok", "x": 0.1 + 0.2, "n": 3, "flag": True, "name": "mnist:/d", "err": None},
        {"run_id": "0123", "kind": "toy", "status": "ok", "x": -1e-300, "n": -7, "flag": False, "name": "default", "err": "ValueError: x, y"},
    ]  # fmt: skip
    leading = {"run_id": "TEXT", "kind": "TEXT", "status": "TEXT"}
    with SweepStore(tmp_path / "t.sqlite", "toy", leading) as store:
        for row in rows:
            assert store.put(row)
        assert store.rows() == rows
        store.export(path)
        assert read_table(path, ("run_id",)) == rows
        # A row with a new column widens the table; earlier rows read an empty cell.
        store.put({"run_id": "c", "kind": "toy", "status": "ok", "x": 2.5, "extra": 1})
        store.export(path)
        back = read_table(path, ("run_id",))
        assert [r["extra"] for r in back] == [None, None, 1]
        assert back[:2] == [r | {"extra": None} for r in rows]
        assert store.columns()["extra"] == "INTEGER" and store.columns()["flag"] == "BOOLEAN"


def test_cli_sweep_json_summary_and_exit_codes(toy, capsys, tmp_path):
    config, calls = toy
    cfg = tmp_path / "toy.json"
    cfg.write_text(json.dumps(config([2.0, -3.0])))
    assert main(["sweep", str(cfg), "--json", "--workers", "1"]) == 1  # one run failed
    out = json.loads(capsys.readouterr().out)
    assert (out["n_total"], out["n_done"], out["n_failed"]) == (2, 1, 1)
    assert out["failed"][0]["error"].startswith("ArithmeticError: negative x = -3.0")
    cfg.write_text(json.dumps(config([2.0]) | {"grid": {"x": [2.0], "z": [1]}}))
    assert main(["sweep", str(cfg)]) == 2
    assert "ufm sweep: error: unknown toy parameter(s) in 'grid': 'z'" in capsys.readouterr().err


def test_example_config_is_valid():
    data, root = sweep.load_config(EXAMPLE)
    runs = expand_grid(data)
    assert len(runs) == math.prod(len(v) for v in data["grid"].values())
    assert root == EXAMPLE.parent


def test_train_sweep_rows_equal_direct_training(tmp_path):
    """Second route: each row of a train sweep equals ``train`` called directly with its settings."""
    from ufm.training import TrainConfig, train

    tiny = dict(
        per_class=5, test_per_class=2, width=8, depth=2, batch_size=10, lr=0.02, epochs=2, device="cpu"
    )
    config = {"kind": "train", "grid": {"wd": [0.0, 5e-3]}, "fixed": tiny, "out": str(tmp_path / "train.csv")}
    res = run_sweep(config, workers=1, progress=False)
    assert (res.n_done, res.n_failed) == (2, 0)
    assert [r["wd"] for r in res.rows] == [0.0, 5e-3] and all(r["nsteps"] == 2 * 5 for r in res.rows)
    row = res.rows[1]
    direct = train(TrainConfig(**(tiny | {"wd": row["wd"]})), progress=False)
    assert row["success"] is True and row["final_lr"] == direct.final["lr"]
    for key in ("train_loss", "objective", "nc1", "nc3", "eps", "rho"):
        assert row[key] == pytest.approx(direct.final[key], rel=1e-5), key


def test_flow_settings_default_to_the_library_policy():
    """Unset integrator settings: the library's default method (named in the row and its run_id) and
    None for rtol, atol, max_nfev, max_seconds (gradient_flow's own defaults)."""
    from ufm.dynamics import DEFAULT_METHOD, METHODS

    (run,) = expand_grid(
        {"kind": "flow", "grid": {"seed": [0]}, "fixed": {"classes": 3, "dim": 3}, "out": "t.csv"}
    )
    assert run["method"] == DEFAULT_METHOD and run["method"] in METHODS
    assert [run[k] for k in ("rtol", "atol", "max_nfev", "max_seconds")] == [None] * 4
    (named,) = expand_grid(
        {
            "kind": "flow",
            "grid": {"seed": [0]},
            "fixed": {"classes": 3, "dim": 3, "method": DEFAULT_METHOD},
            "out": "t.csv",
        }
    )
    assert sweep.run_id("flow", named) == sweep.run_id("flow", run)


# C = 3, N = 2, lam_h = 0.1: delta = C sqrt(N lam_w lam_h) = 0.4243 at lam_w = 0.1 (collapse) and
# 1.2 at lam_w = 0.8 (past the threshold: the zero solution), with and without a bias. The integrator
# and its tolerances are the library's defaults.
FLOW_SWEEP = {
    "kind": "flow",
    "grid": {"lam_w": [0.1, 0.8], "bias": [True, False]},
    "fixed": {"classes": 3, "per_class": 2, "dim": 3, "lam_h": 0.1, "t_max": 2e3, "tol": 1e-8},
}


def _typed_closed_form(lam_w: float, lam_h: float, bias: bool) -> dict:
    """docs/theory.md §5 at C = 3, N = 2, typed out: k = C-1 with a bias, C without;
    delta < 1: eps = k delta/C, loss = (k/C)(delta - delta^2/2), cos_w = -1/(C-1) or 0, cos_h = -1/(C-1);
    delta >= 1 (zero solution): eps = k/C, loss = k/(2C), no directions."""
    C, N = 3, 2
    k, delta = (C - 1 if bias else C), C * math.sqrt(N * lam_w * lam_h)
    if delta >= 1:
        return {"eps": k / C, "loss": k / (2 * C), "geometry": "zero", "cos_w": None, "cos_h": None}
    return {
        "eps": k * delta / C, "loss": k / C * (delta - delta**2 / 2),
        "geometry": "simplex_etf" if bias else "orthogonal_frame",
        "cos_w": -0.5 if bias else 0.0, "cos_h": -0.5,
    }  # fmt: skip


def _assert_flow_rows_match_closed_form(rows):
    from ufm.dynamics import DEFAULT_METHOD

    assert len(rows) == 4
    for r in rows:
        assert r["status"] == "ok" and r["success"] is True and r["flow_status"] == 1, r
        assert r["method"] == DEFAULT_METHOD
        ref = _typed_closed_form(r["lam_w"], r["lam_h"], r["bias"])
        # The closed-form columns are the closed form of the row's own settings.
        assert r["cf_eps"] == pytest.approx(ref["eps"], rel=1e-12)
        assert r["cf_loss"] == pytest.approx(ref["loss"], rel=1e-12)
        assert r["cf_geometry"] == ref["geometry"] and r["closed_form_note"] is None
        # The flow's end point reaches it.
        assert r["eps"] == pytest.approx(ref["eps"], abs=FLOW_RTOL)
        assert r["final_loss"] == pytest.approx(ref["loss"], rel=FLOW_RTOL)
        assert r["reached"] is True
        if ref["cos_w"] is not None:
            assert r["cos_w"] == pytest.approx(ref["cos_w"], abs=FLOW_RTOL)
            assert r["cos_h"] == pytest.approx(ref["cos_h"], abs=FLOW_RTOL)
        else:
            assert r["w_row_norm_sq"] < 1e-8  # the zero solution


def test_flow_sweep_budget_and_the_cross_entropy_closed_form(tmp_path):
    """max_nfev stops a run with its own status (a finished row, not a failed run); cross-entropy's
    closed-form columns hold docs/theory.md §9 typed out: delta = 3 sqrt(2) 0.1, eps = (2/3) delta,
    loss = -log(1 - eps) + eps log(2 (1 - eps)/eps)."""
    config = {
        "kind": "flow",
        "grid": {"loss": ["mse", "ce"]},
        "fixed": {"classes": 3, "per_class": 2, "dim": 3, "lam_w": 0.1, "lam_h": 0.1, "max_nfev": 5},
        "out": str(tmp_path / "budget.csv"),
    }
    res = run_sweep(config, workers=1, progress=False)
    assert (res.n_done, res.n_failed) == (2, 0)
    mse, ce = res.rows
    for r in res.rows:
        assert r["success"] is False and r["flow_status"] == 3 and "max_nfev" in r["message"]
        assert r["nfev"] <= 5 + 2  # an integrator may finish the step it is in
    assert mse["cf_loss"] == pytest.approx(_typed_closed_form(0.1, 0.1, True)["loss"], rel=1e-12)
    eps = 2 / 3 * 3 * math.sqrt(2) * 0.1
    assert ce["cf_loss"] == pytest.approx(-math.log(1 - eps) + eps * math.log(2 * (1 - eps) / eps), rel=1e-12)
    assert ce["closed_form_note"] is None


def test_flow_sweep_on_pool_and_dask_cluster_agree_with_the_closed_form(tmp_path):
    from dask.distributed import LocalCluster

    local = run_sweep(FLOW_SWEEP | {"out": str(tmp_path / "pool.csv")}, workers=2, progress=False)
    _assert_flow_rows_match_closed_form(local.rows)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        dask = run_sweep(
            FLOW_SWEEP | {"out": str(tmp_path / "dask.parquet")},
            scheduler=cluster.scheduler_address,
            progress=False,
        )
    assert (dask.n_done, dask.n_failed) == (4, 0)
    _assert_flow_rows_match_closed_form(read_table(dask.table))
    for a, b in zip(local.rows, dask.rows):
        assert a["run_id"] == b["run_id"]
        assert b["eps"] == pytest.approx(a["eps"], abs=1e-12) and b["nfev"] == a["nfev"]
    # Smoke test of the sweep figures on these rows (the claims: flow end point = closed form).
    from ufm.experiments.plots import plot_sweep, plot_theory_vs_measurement

    assert plot_theory_vs_measurement(local.table, tmp_path / "scatter.png").stat().st_size > 0
    assert (
        plot_sweep(dask.rows, tmp_path / "phase.png", x="lam_w", y="eps", theory="cf_eps").stat().st_size > 0
    )
    with pytest.raises(ValueError, match="no column 'nc9'"):
        plot_sweep(dask.rows, tmp_path / "bad.png", y="nc9")


def test_flow_grid_takes_the_model_flags(tmp_path):
    """per_class (one count or C counts), lam_b, per-layer lam_w and depth are sweep settings; a list
    is written as the CLI's comma-separated text, and every row says what its end point is."""
    config = {
        "kind": "flow",
        "grid": {"per_class": [2, [3, 2, 1]], "lam_b": [0.0, 1.0]},
        "fixed": {"classes": 3, "dim": 3, "depth": 2, "lam_w": [0.02, 0.03], "lam_h": 0.02},
        "out": str(tmp_path / "model.csv"),
    }
    runs = expand_grid(config)
    assert [(r["per_class"], r["lam_b"]) for r in runs] == [
        (2, 0.0),
        (2, 1.0),
        ((3, 2, 1), 0.0),
        ((3, 2, 1), 1.0),
    ]
    assert all(r["lam_w"] == (0.02, 0.03) for r in runs)
    res = run_sweep(config, workers=1, progress=False)
    assert (res.n_done, res.n_failed) == (4, 0)
    table = read_table(res.table, ("run_id", "kind"))
    assert [r["per_class"] for r in table] == [2, 2, "3,2,1", "3,2,1"] and table[0]["lam_w"] == "0.02,0.03"
    assert len(str(table[2]["cf_w_row_norm_sq"]).split(",")) == 3  # one per class
    for r in table:
        assert r["critical_point"] in ("minimum", "saddle") and r["geometry"] in (
            "simplex_etf",
            "other",
            "zero",
        )
        # depth 2 has a closed form (docs/theory.md §7) only with an unregularized bias
        assert bool(r["closed_form_note"]) == (r["lam_b"] > 0)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"per_class": [[3, "x", 1]]}, r"grid.per_class\[0\]\[1\] must be int"),
        ({"lam_w": [[0.1, 0.2]]}, "lam_w has 2 entries but depth = 1"),
        ({"lam_b": [1.0], "bias": [False]}, "bias = false"),
    ],
)
def test_bad_model_settings_are_refused_before_running(tmp_path, grid, message):
    config = {"kind": "flow", "grid": grid, "fixed": {"classes": 3}, "out": str(tmp_path / "t.csv")}
    with pytest.raises(ValueError, match=message):
        expand_grid(config)


def test_parquet_table_refuses_a_column_of_mixed_forms(tmp_path):
    pytest.importorskip("pyarrow")
    config = {
        "kind": "flow", "grid": {"per_class": [2, [3, 2, 1]]}, "fixed": {"classes": 3},
        "out": str(tmp_path / "t.parquet"),
    }  # fmt: skip
    with pytest.raises(ValueError, match="mixes int and str"):
        run_sweep(config, workers=1, progress=False)
    assert not (tmp_path / "t.parquet").exists()
