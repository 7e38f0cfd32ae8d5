"""Fault injection (issue 17): kills, concurrent writers, a full disk, corrupt files, huge labels.

Each fault is injected into a real subprocess (SIGKILL, SIGTERM, SIGINT, ``resource.setrlimit``),
with a timeout, so a hang fails the test instead of stalling CI. The sweeps use a toy runner (y = x^2,
sleeping ``sleep`` seconds) from a module written into the test's directory, so the workers import it
by name; each call leaves a marker file ``<worker pid>-<x>`` for counting calls and finding workers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ufm.experiments.store import read_store, store_path
from ufm.tables import read_table

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # any one subprocess; a healthy one takes seconds

TOY = """
import os, time
from pathlib import Path

def run(settings):
    (Path(settings["log"]) / f"{os.getpid()}-{settings['x']:g}").touch()
    time.sleep(settings["sleep"])
    return {"y": settings["x"] ** 2}

def check(settings):
    pass
"""

DRIVER = """
import sys
sys.path.insert(0, {here!r})
if __name__ == "__main__":  # the workers import this file as their __main__ too
    import toyrunner
    from ufm.experiments.sweep import RUNNERS, Runner
    PARAMETERS = {{"x": ((float,), 0.0), "log": ((str,), ""), "sleep": ((float,), 0.0)}}
    RUNNERS["toy"] = Runner(toyrunner.run, PARAMETERS, toyrunner.check)
    from ufm.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def toy_sweep(tmp_path):
    """Write the toy runner and a driver; returns (start(xs, sleep, workers) -> Popen, log dir)."""
    (tmp_path / "toyrunner.py").write_text(TOY)
    (tmp_path / "drive.py").write_text(DRIVER.format(here=str(tmp_path)))
    log = tmp_path / "calls"
    log.mkdir()

    def start(xs, sleep=0.0, workers=1, **popen):
        cfg = tmp_path / "sweep.toml"
        cfg.write_text(
            textwrap.dedent(f"""
            kind = "toy"
            out = "toy.csv"
            workers = {workers}
            [grid]
            x = {[float(x) for x in xs]!r}
            [fixed]
            log = {str(log)!r}
            sleep = {sleep!r}
            """)
        )
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "drive.py"), "sweep", str(cfg), "--json"],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
        )  # fmt: skip

    return start, log


def _store_rows(table: Path) -> list[tuple]:
    """(run_id, status, x, y) of every row of the store, after SQLite's own integrity check."""
    with sqlite3.connect(store_path(table)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return [(r["run_id"], r["status"], r["x"], r.get("y")) for r in read_store(store_path(table))]


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_two_concurrent_sweeps_on_one_store_lose_and_duplicate_nothing(toy_sweep, tmp_path):
    """Before the store each process rewrote the table from its own rows: two 10-run grids started
    together left 19 rows (3 of 3 trials)."""
    start, log = toy_sweep
    xs = range(12)
    procs = [start(xs, sleep=0.05), start(xs, sleep=0.05)]
    for p in procs:
        p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0
    rows = _store_rows(tmp_path / "toy.csv")
    assert sorted(r[2] for r in rows) == [float(x) for x in xs]
    assert all(r[1] == "ok" and r[3] == r[2] ** 2 for r in rows)
    table = read_table(tmp_path / "toy.csv", ("run_id",))
    assert sorted(r["x"] for r in table) == [float(x) for x in xs]
    # Each run ran at least once; a run is only repeated when both sweeps picked it up at once.
    assert len(list(log.iterdir())) >= len(xs)


def test_sigkill_at_any_moment_leaves_a_store_the_next_sweep_resumes(toy_sweep, tmp_path):
    """Kill the sweep (SIGKILL, no cleanup) at several moments while rows are being written; each
    time the store is intact and the next sweep runs exactly the missing runs."""
    start, log = toy_sweep
    xs = range(40)
    for delay in (0.0, 0.3, 0.6):
        p = start(xs, sleep=0.01, workers=2)
        _wait_for(lambda: len(list(log.iterdir())) > 0, TIMEOUT_S)
        time.sleep(delay)
        p.kill()
        p.communicate(timeout=TIMEOUT_S)
        stored = _store_rows(tmp_path / "toy.csv") if store_path(tmp_path / "toy.csv").exists() else []
        assert len({r[0] for r in stored}) == len(stored)  # no duplicate run
    p = start(xs, sleep=0.01, workers=2)  # the same runs (sleep is part of their identity)
    out, err = p.communicate(timeout=TIMEOUT_S)
    assert p.returncode == 0, err
    rows = _store_rows(tmp_path / "toy.csv")
    assert sorted(r[2] for r in rows) == [float(x) for x in xs] and all(r[1] == "ok" for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_workers_and_exit_with_one_line(toy_sweep, tmp_path, sig):
    """Before: SIGTERM left the fork server, the workers and the resource tracker running; SIGINT
    printed a traceback."""
    start, log = toy_sweep
    p = start(range(4), sleep=60.0, workers=2)
    assert _wait_for(lambda: len(list(log.iterdir())) == 2, TIMEOUT_S)  # both workers are in a run
    workers = [int(f.name.split("-")[0]) for f in log.iterdir()]
    p.send_signal(sig)
    out, err = p.communicate(timeout=TIMEOUT_S)
    assert p.returncode == 128 + sig
    lines = [
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and "sweep toy" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith(f"ufm sweep: interrupted by {sig.name}"), err
    assert "resume" in lines[0]
    assert _wait_for(lambda: not any(map(_alive, workers)), 10)


def test_sigkill_of_the_sweep_leaves_no_worker_running(toy_sweep):
    """A killed sweep cannot stop its workers; they watch it and exit within about PARENT_POLL_S."""
    start, log = toy_sweep
    p = start(range(4), sleep=60.0, workers=2)
    assert _wait_for(lambda: len(list(log.iterdir())) == 2, TIMEOUT_S)
    workers = [int(f.name.split("-")[0]) for f in log.iterdir()]
    p.kill()
    p.communicate(timeout=TIMEOUT_S)
    assert _wait_for(lambda: not any(map(_alive, workers)), 10)


# ----------------------------------------------------------------------------------------------------
# Training: corrupt checkpoints, a full disk


TRAIN = "train --epochs 2 --per-class 5 --batch-size 10 --width 8 --depth 2 --device cpu --json".split()


def _ufm(*args: str, limits: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ufm ARGS`` in a subprocess, after the Python statements ``limits`` (resource limits)."""
    code = f"import sys\n{limits}\nfrom ufm.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    res = _ufm(*TRAIN, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "zero-filled":
        path.write_bytes(bytes(len(data)))
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "wrong dict":
        import torch

        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")


@pytest.mark.parametrize("kind", ["zero-filled", "random", "empty", "truncated", "wrong dict", "text"])
def test_corrupt_checkpoint_gives_one_line_naming_the_file(finished_run, tmp_path, kind):
    """Before: zero-filled said to set weights_only=False, truncated gave "[Errno 22]" without a file,
    empty an EOFError, a wrong dict a KeyError traceback."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    _corrupt(run / "checkpoint.pt", kind)
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    res = _ufm(*TRAIN, "--out", str(run), "--resume")
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("ufm train: error: cannot resume from ") and str(run / "checkpoint.pt") in line
    assert "weights_only" not in line and "--overwrite" in line
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # nothing changed


def test_train_over_an_existing_run_is_refused_and_changes_nothing(finished_run, tmp_path):
    """Before: a new run replaced config.json and history.csv but kept the old checkpoint and final.json."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    res = _ufm(*TRAIN, "--seed", "3", "--out", str(run))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert str(run) in line and "--resume" in line and "--overwrite" in line and "seed=0" in line
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    res = _ufm(*TRAIN, "--seed", "3", "--out", str(run), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert '"seed": 3' in (run / "config.json").read_text()
    assert sorted(f.name for f in run.iterdir()) == sorted(before)


# Small enough that the first checkpoint (about 60 KB at width 64) does not fit, large enough for the
# configuration and the first history rows.
FSIZE_LIMIT = 20_000


def test_disk_full_while_checkpointing_leaves_no_tmp_and_a_message(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored: writes then fail with EFBIG as on a full
    disk). Before: a RuntimeError traceback from torch's zip writer and a 20000-byte checkpoint.tmp."""
    limits = (
        "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT}))"
    )
    out = tmp_path / "r"
    args = [a if a != "8" else "64" for a in TRAIN]  # width 64: a checkpoint of about 60 KB
    res = _ufm(*args, "--out", str(out), limits=limits)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"ufm train: error: cannot write {out / 'checkpoint.pt'}") and "disk full" in line
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------
# Metrics: a label of 10^9 under a memory limit

# Address space for the subprocess: enough for Python, NumPy and torch (about 1.5 GB measured on this
# machine), far below the 8 GB that per-class arrays for 10^9 classes would take.
MEMORY_LIMIT = 3 << 30


def test_a_label_of_1e9_is_refused_before_allocating(tmp_path):
    """Before: 7.45 GiB for np.bincount, killed (23.7 GB resident without a limit)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    y[0] = 10**9
    np.savez(tmp_path / "f.npz", features=rng.standard_normal((40, 5)), labels=y)
    limits = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))"
    res = _ufm("metrics", str(tmp_path / "f.npz"), limits=limits)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "1000000000" in line and "40 examples" in line


# ----------------------------------------------------------------------------------------------------
# Numbers in range, limits before work, messages (in process: each is one call)


def test_nc_metrics_is_bit_for_bit_invariant_under_powers_of_two():
    """Before: nc_metrics(X * 1e200, y) gave NaN for nc2_* and at 1e-200 "vectors are all zero"."""
    from ufm.metrics import nc_metrics

    rng = np.random.default_rng(1)
    X, y, W = rng.standard_normal((60, 6)), np.repeat(np.arange(4), 15), rng.standard_normal((4, 6))
    ref = nc_metrics(X, y, W).as_dict()
    for k in (-900, -664, -1, 1, 664, 900):  # results stay normal numbers (no subnormal rounding)
        got = nc_metrics(np.ldexp(X, k), y, np.ldexp(W, -k)).as_dict()  # W h unchanged
        for key, value in ref.items():
            if key == "sv_means":
                assert list(got[key]) == np.ldexp(value, k).tolist(), (k, key)
            elif key == "sv_w":
                assert list(got[key]) == np.ldexp(value, -k).tolist(), (k, key)
            else:
                assert got[key] == value, (k, key)
    for s in (1e200, 1e-200):  # not a power of two: X * s is rounded, so agreement to rounding
        got = nc_metrics(X * s, y).as_dict()
        for key in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle", "etf_distance"):
            assert got[key] == pytest.approx(ref[key], rel=1e-12), (s, key)


def test_label_and_classifier_messages_name_the_problem(tmp_path):
    from ufm.metrics import load_features, nc_metrics

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 5)), np.repeat(np.arange(4), 5)
    with pytest.raises(ValueError, match=r"labels must be integers.*dtype <U.*np.unique"):
        nc_metrics(X, y.astype(str))  # before: a TypeError traceback from np.isfinite
    with pytest.raises(ValueError, match=r"got \(5, 4\); it looks transposed: pass W.T"):
        nc_metrics(X, y, rng.standard_normal((4, 5)).T)  # before: "classes with no examples: [4]"
    (tmp_path / "f.npz").write_text("features, labels\n")
    with pytest.raises(ValueError, match=r"f.npz is not a NumPy .npz archive \(not a zip file\)"):
        load_features(str(tmp_path / "f.npz"))  # before: "This file contains pickled (object) data"


def test_closed_form_norms_past_the_product_range():
    """||W_c||^2 = sqrt(lam_h N / lam_w) q with q = (1 - delta)(C-1)/C (docs/theory.md §5), typed out in
    logarithms. Before: inf at (1e-300, 1e200) and a ZeroDivisionError at (1e200, 1e-300)."""
    from ufm.closed_form import ufm_optimum

    C, N = 4, 5
    for lam_w, lam_h in ((1e-300, 1e200), (1e200, 1e-300)):
        opt = ufm_optimum(C, N, lam_w, lam_h)
        delta = C * math.exp(0.5 * (math.log(N) + math.log(lam_w) + math.log(lam_h)))
        s = math.exp(0.5 * (math.log(lam_h) + math.log(N) - math.log(lam_w)))
        q = (1 - delta) * (C - 1) / C
        assert opt.delta == pytest.approx(delta, rel=1e-14)
        assert opt.w_row_norm_sq == pytest.approx(s * q, rel=1e-12)
        assert opt.h_norm_sq == pytest.approx(q / s, rel=1e-12)
    with pytest.raises(ValueError, match="beyond the floating range"):
        ufm_optimum(C, N, 1e-320, 1e300)  # s = 2.2e310


def test_cli_range_and_flag_messages(capsys):
    from ufm.cli import main

    assert (
        main(["solve", "-C", "4", "-N", "5", "-p", "4", "--lam-w", "1e-300", "--lam-h", "1e200", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["w_row_norm_sq"] == pytest.approx(1.677050983e250, rel=1e-9)
    assert main(["solve", "-C", "4", "-N", "5", "-p", "4", "--lam-w", "1e200", "--lam-h", "1e-300"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["flow", "-C", "3", "-N", "2", "-p", "3", "--lam-w", "0.1", "--lam-h", "0.1", "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: expected an integer >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # before: "numeric_points must be >= 1", a name the CLI lacks
        main(["prove", "etf", "--points", "0"])
    assert exit_.value.code == 2
    assert "argument --points: expected an integer >= 1, got '0'" in capsys.readouterr().err
    # Before: exit 0 with a "closed form" for p >= 3 beside a flow at p = 2.
    args = ["flow", "-C", "4", "-N", "2", "-p", "2", "--lam-w", "0.1", "--lam-h", "0.1", "--t-max", "10"]
    main([*args, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["closed_form"] is None and "p = 2 is below the rank 3" in out["closed_form_note"]
    main(args)
    assert "(no closed form: p = 2 is below the rank 3" in capsys.readouterr().out
    # A state that cannot fit: refused before allocating (before: numpy's 7.28 TiB MemoryError traceback).
    huge = ["flow", "-C", "100000", "-N", "100", "-p", "100000", "--lam-w", "0.1", "--lam-h", "0.1"]
    assert main(huge) == 2
    assert "GiB of memory available; choose a smaller problem" in capsys.readouterr().err
    # ufm solve --verify at p = 1e8 (before: numpy's MemoryError traceback), and at depth 3, p = 4e4,
    # where building the minimizer's 40000 x 40000 layers before L-BFGS was killed by the kernel.
    for p, depth in [("100000000", "1"), ("40000", "3")]:
        args = f"solve -C 3 -N 2 -p {p} --depth {depth} --lam-w 0.01 --lam-h 0.01".split()
        assert main([*args, "--verify"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ufm solve: error: L-BFGS at C = 3, n = 6, p = {p}, depth {depth} needs about")
    from ufm import UFMParams, UFMProblem

    with pytest.raises(ValueError, match=r"^a random start at n = 6, p = 10000000000, depth 1 needs about"):
        UFMParams.random(UFMProblem(3, 2, 0.1, 0.1), 10**10)


def test_grids_are_bounded_before_anything_is_built(tmp_path):
    """Before: an empty [grid] ran one default flow; a 10^6-point grid was expanded and submitted whole."""
    from ufm.experiments.sweep import MAX_RUNS, expand_grid

    base = {"kind": "flow", "fixed": {"classes": 3, "dim": 3}, "out": "t.csv"}
    with pytest.raises(ValueError, match=r"\[grid\] is empty.*seed = \[0\]"):
        expand_grid(base)
    big = base | {"grid": {"seed": list(range(1000)), "lam_w": [1e-3 * (1 + i) for i in range(1000)]}}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"1000000 runs \(1000 x 1000\), more than max_runs = {MAX_RUNS}"):
        expand_grid(big)
    assert time.perf_counter() - t0 < 5  # counted, not built (building and checking takes minutes)
    assert len(expand_grid(base | {"grid": {"seed": [0, 1, 2]}}, max_runs=3)) == 3
    with pytest.raises(ValueError, match="more than max_runs = 2"):
        expand_grid(base | {"grid": {"seed": [0, 1, 2]}}, max_runs=2)


def test_dop853_on_a_stiff_flow_stops_within_its_time_budget():
    """lambda = 1e6 makes the flow stiff: DOP853 takes steps ~1e-6 long and ran past 90 s without a
    budget. The wall-time budget is checked between steps, each of which takes microseconds."""
    from ufm.dynamics import gradient_flow
    from ufm.model import UFMParams, UFMProblem

    problem = UFMProblem(3, 2, 1e6, 1e6)
    start = UFMParams.random(problem, 3, rng=0)
    t0 = time.perf_counter()
    r = gradient_flow(problem, start, method="DOP853", max_seconds=1.0)
    assert r.status == 4 and "max_seconds" in r.message
    assert time.perf_counter() - t0 < 5.0


def test_dead_relus_name_the_epoch_and_give_a_hint(monkeypatch):
    """Before: "all class means are equal (to rounding)" with no epoch and no hint. The last hidden
    layer is made non-positive: its inputs are ReLU outputs (>= 0), so every feature is ReLU(<= 0) = 0."""
    import torch

    from ufm import training
    from ufm.datasets import load_dataset

    build = training.build_network

    def dead(*args, **kwargs):
        net = build(*args, **kwargs)
        with torch.no_grad():
            net.layers[-2].W.abs_().neg_()
        return net

    monkeypatch.setattr(training, "build_network", dead)
    config = training.TrainConfig(
        per_class=5, test_per_class=2, width=8, depth=3, batch_size=10, epochs=1, device="cpu"
    )
    with pytest.raises(
        ValueError, match=r"after epoch 0: all class means are equal.*ReLUs .* dead.*lower --lr"
    ):
        training.train(config, progress=False, dataset=load_dataset("default", per_class=5, test_per_class=2))


def test_reproduce_replaces_its_directory_whole(tmp_path):
    """A run is written into ``.NAME.partial-PID`` and replaces ``out`` only when complete: a run killed
    midway leaves ``out`` as it was, and a finished one leaves no file of the previous run beside its own
    (before: report.md of one seed beside tables of another)."""
    from ufm.experiments.reproduce import _move_into_place, _staging

    out = tmp_path / "figures"
    out.mkdir()
    (out / "report.md").write_text("run 1")
    (out / "stale.csv").write_text("run 1")
    stage = _staging(out)
    (stage / "report.md").write_text("run 2")
    assert (out / "report.md").read_text() == "run 1"  # a kill here changes nothing in out
    _move_into_place(stage, out)
    assert (
        sorted(f.name for f in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "run 2"
    )
    assert sorted(f.name for f in tmp_path.iterdir()) == ["figures"]  # no partial or old directory left


def test_reproduce_refuses_an_out_it_must_not_replace(tmp_path, monkeypatch):
    """The finished run replaces ``out`` whole, so ``out`` must be new, empty or an earlier run: a file, a
    directory of other files and the current directory are refused before any part runs (before: the
    user's file was renamed aside and a directory of their files deleted, after the whole run)."""
    from ufm.experiments import reproduce as rep

    def no_run():
        raise AssertionError("a part ran before --out was checked")

    monkeypatch.setattr(rep, "_staging", lambda out: no_run())
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("mine")
    (mine / "report.md").write_text("mine")  # one marker is not an earlier run
    cases = {
        notes: "is a file, not a directory",
        mine: "holds files that are not an earlier run of ufm reproduce",
        tmp_path: "is the current directory or holds it",
    }
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for out, message in cases.items():
        with pytest.raises(ValueError, match=message):
            rep.reproduce(out, quick=True, progress=False)
    assert notes.read_text() == "mine" and sorted(f.name for f in mine.iterdir()) == ["data.csv", "report.md"]
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "figures"
    earlier.mkdir()
    for name in rep.RUN_MARKERS:
        (earlier / name).write_text("run 1")
    (tmp_path / "empty").mkdir()
    for fine in (earlier, tmp_path / "empty", tmp_path / "new" / "deeper"):
        with pytest.raises(AssertionError, match="a part ran"):  # past the check
            rep.reproduce(fine, quick=True, progress=False)
    res = _ufm("reproduce", "--quick", "--out", str(notes))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"ufm reproduce: error: --out {notes} is a file"), res.stderr


def test_flow_out_is_checked_before_the_flow_and_never_overwritten(tmp_path, monkeypatch, capsys):
    """``ufm flow --out``: a file or an uncreatable path fails before the flow (whose work it would
    lose), and a directory holding an earlier flow's files is refused unless ``--overwrite``."""
    from ufm.cli import main
    from ufm.experiments import compare

    flow = ["flow", "-C", "3", "-N", "2", "-p", "4", "--lam-w", "0.02", "--lam-h", "0.02", "--json", "--out"]
    compare_flow = compare.compare_flow
    monkeypatch.setattr(compare, "compare_flow", lambda *a, **k: pytest.fail("the flow ran"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, message in [
        (notes, f"--out {notes} is a file, not a directory"),
        (notes / "sub", f"cannot create the --out directory {notes / 'sub'}: Not a directory"),
    ]:
        assert main([*flow, str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"ufm flow: error: {message}")
    monkeypatch.setattr(compare, "compare_flow", compare_flow)
    out = tmp_path / "run"
    assert main([*flow, str(out)]) == 0
    first = (out / "trajectory.csv").read_text()
    capsys.readouterr()
    assert main([*flow, str(out), "--lam-h", "0.03"]) == 2
    err = capsys.readouterr().err
    assert "already holds trajectory.csv, flow.png of an earlier run" in err and "--overwrite" in err
    assert (out / "trajectory.csv").read_text() == first
    assert main([*flow, str(out), "--lam-h", "0.03", "--overwrite"]) == 0
    assert (out / "trajectory.csv").read_text() != first


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    """Before: Ctrl-C printed a KeyboardInterrupt traceback from wherever the command was (the flow's
    integrator, a proof, an SGD step). Now one line, status 130 (128 + SIGINT, as ufm sweep), and for
    train what it leaves behind."""
    from ufm import training
    from ufm.cli import main
    from ufm.experiments import compare

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare_flow", interrupt)
    assert main(["flow", "-C", "3", "-N", "2", "-p", "4", "--lam-w", "0.1", "--lam-h", "0.1"]) == 130
    assert capsys.readouterr().err == "\nufm flow: interrupted\n"
    out = tmp_path / "run"

    def interrupt_after_a_checkpoint(*args, **kwargs):
        out.mkdir()
        (out / training.CHECKPOINT).write_bytes(b"")
        raise KeyboardInterrupt

    for fake, hint in [
        (interrupt, f"no checkpoint was written to {out} yet"),
        (
            interrupt_after_a_checkpoint,
            f"{out} holds the last checkpoint; continue with the same command and --resume",
        ),
    ]:
        monkeypatch.setattr(training, "train", fake)
        assert main(["train", "--out", str(out)]) == 130
        assert capsys.readouterr().err == f"\nufm train: interrupted; {hint}\n"


def test_train_out_that_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    res = _ufm(*TRAIN, "--out", str(notes))
    assert res.returncode == 2 and "Traceback" not in res.stderr and notes.read_text() == "mine"
    assert f"--out {notes} is a file, not a directory" in res.stderr, res.stderr
