"""The ``ufm`` command line: label smoothing, per-class counts, the library's integrator and budgets.

Every expected number is typed out from the closed form derived in docs/theory.md §5 (not computed by
the library): with label smoothing a, delta = C sqrt(N lam_w lam_h) and delta < 1 - a,

* with a bias: loss = (C-1)/C (delta (1-a) - delta^2/2), eps = (C-1)(a + delta)/C;
* without one: loss = [(C-1)(delta (1-a) - delta^2/2) + delta - delta^2/2]/C,
  eps = ((C-1)(a + delta) + delta)/C;
* the smoothed targets' own eps: a (C-1)/C.

At C = 4, N = 5, lam_w = lam_h = 0.02, a = 0.1: delta = 0.178885438199983 (values to 30 digits in mpmath).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ufm.cli import main

ROOT = Path(__file__).resolve().parents[1]

PROBLEM = ["-C", "4", "-N", "5", "--lam-w", "0.02", "--lam-h", "0.02"]
SMOOTHING = 0.1
# (bias) -> (minimal loss, eps) at PROBLEM with a = 0.1, typed out (module docstring).
SMOOTHED = {
    True: (0.108747670784988643606, 0.209164078649987381785),
    False: (0.149469030334984437534, 0.253885438199983175713),
}
EPS_OF_THE_SMOOTHING = 0.075  # a (C-1)/C = 0.1 * 3/4
# The flow stops at ||grad L|| < 1e-8; its loss is then within ~1e-14 of the minimum, eps within ~1e-8.
FLOW_AGREEMENT = 1e-6

# ``ufm flow --json`` keys that users read today (issue 13 keeps them).
FLOW_JSON_KEYS = {
    "success", "status", "message", "method", "t", "n_grad_evals", "grad_norm", "loss", "eps", "nc1",
    "cos_w", "nc2_equinorm_w", "nc3", "closed_form", "closed_form_note",
    # issue 14: what the end point is (ufm.critical)
    "geometry", "rank", "hessian_min_eig", "critical_point",
}  # fmt: skip
CLOSED_FORM_KEYS = {"eps", "loss", "cos_w", "w_row_norm_sq", "geometry", "delta"}
# The integrators the spec names (ufm.dynamics.METHODS).
METHOD_NAMES = ("ETD2", "RK23", "RK45", "DOP853", "BDF", "Radau", "LSODA")


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_building_the_parser_imports_no_heavy_module():
    code = (
        "import sys; from ufm.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'sympy', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "unused"),
    [
        (["--help"], ("torch", "sympy", "scipy")),
        (["solve", *PROBLEM, "-p", "4", "--json"], ("torch", "sympy", "scipy")),
    ],
)
def test_commands_import_only_what_they_use(argv, unused):
    """`ufm --help` and `ufm solve` (closed form) run without SciPy, torch or SymPy. (--verify needs
    SciPy for L-BFGS and torch for the Hessian that classifies its end point.) A property of the imports, checked in a fresh interpreter; the start-up time
    itself is measured in benchmarks/bench_startup.py."""
    code = (
        "import sys; from ufm.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {unused!r} if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("bias", [True, False])
def test_solve_label_smoothing_json_is_the_typed_closed_form(bias, capsys):
    args = ["solve", *PROBLEM, "-p", "4", "--label-smoothing", str(SMOOTHING), "--json"]
    assert main(args + ([] if bias else ["--no-bias"])) == 0
    out = _json(capsys)
    loss, eps = SMOOTHED[bias]
    assert out["loss"] == pytest.approx(loss, rel=1e-12)
    assert out["eps"] == pytest.approx(eps, rel=1e-12)
    assert out["label_smoothing"] == SMOOTHING
    assert out["eps_label_smoothing"] == pytest.approx(EPS_OF_THE_SMOOTHING, rel=1e-12)


def test_solve_label_smoothing_verified_by_lbfgs(capsys):
    args = ["solve", *PROBLEM, "-p", "4", "--label-smoothing", str(SMOOTHING), "--json", "--verify"]
    assert main(args + ["--starts", "2"]) == 0
    out = _json(capsys)
    assert out["verify"]["loss_numeric"] == pytest.approx(SMOOTHED[True][0], rel=1e-6)


def test_solve_table_shows_both_eps_side_by_side(capsys):
    assert main(["solve", *PROBLEM, "-p", "4", "--label-smoothing", str(SMOOTHING)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sqi = next(i for i, line in enumerate(lines) if "eps of SQI" in line)
    assert "eps of the smoothing" in lines[sqi + 1]
    assert float(lines[sqi].split()[-1]) == pytest.approx(SMOOTHED[True][1], rel=1e-9)
    assert float(lines[sqi + 1].split()[-1]) == pytest.approx(EPS_OF_THE_SMOOTHING, rel=1e-9)


def test_solve_table_shows_runs_of_equal_entries_once(capsys):
    """At C = 2000 the table printed 2000 biases and 2000 singular values on one line each (29 kB).
    The balanced closed form with a bias (docs/theory.md §5) has b_c = 1/C and C-1 equal singular
    values of Z beside a zero: one run each. --json keeps every entry."""
    args = ["solve", "-C", "40", "-N", "1", "-p", "40", "--lam-w", "1e-5", "--lam-h", "1e-5"]
    assert main(args) == 0
    rows = {line[:40].strip(): line[40:].strip() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["b"] == "[0.025 (x 40)]"
    assert re.fullmatch(r"\[0\.\d+ \(x 39\), 0\]", rows["singular values of Z"]), rows["singular values of Z"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["b"] == pytest.approx([1 / 40] * 40, rel=1e-12) and len(out["z_singular_values"]) == 40


def test_solve_imbalanced_cross_entropy_is_exit_2_naming_the_counts(capsys):
    args = ["solve", "-C", "3", "--per-class", "8,4,2", "-p", "3", "--lam-w", "0.01", "--lam-h", "0.01"]
    assert main(args + ["--loss", "ce"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ufm solve: error:") and "per-class counts (8, 4, 2)" in err


def test_flow_imbalanced_counts_reaches_the_numerical_spectrum_closed_form(capsys):
    """Counts with a bias have a closed form whose target spectrum is computed numerically (§8); the
    flow from a random start ends at its loss."""
    args = ["flow", "-C", "3", "--per-class", "8,4,2", "-p", "4", "--lam-w", "0.02", "--lam-h", "0.02"]
    assert main(args + ["--json"]) == 0
    out = _json(capsys)
    assert set(out) == FLOW_JSON_KEYS
    assert out["status"] == 1 and out["grad_norm"] < 1e-8
    assert out["loss"] == pytest.approx(out["closed_form"]["loss"], rel=FLOW_AGREEMENT)
    assert len(out["closed_form"]["w_row_norm_sq"]) == 3
    assert out["closed_form_note"] is None


def test_flow_label_smoothing_reaches_the_typed_closed_form(capsys):
    assert main(["flow", *PROBLEM, "-p", "5", "--label-smoothing", str(SMOOTHING), "--json"]) == 0
    out = _json(capsys)
    assert set(out) == FLOW_JSON_KEYS and set(out["closed_form"]) == CLOSED_FORM_KEYS
    loss, eps = SMOOTHED[True]
    assert out["closed_form"]["loss"] == pytest.approx(loss, rel=1e-12)
    assert out["loss"] == pytest.approx(loss, rel=FLOW_AGREEMENT)
    assert out["eps"] == pytest.approx(eps, rel=FLOW_AGREEMENT)
    assert out["closed_form_note"] is None
    assert out["method"] in METHOD_NAMES


def test_flow_budget_of_gradient_evaluations_is_a_failure_naming_it(capsys):
    assert main(["flow", *PROBLEM, "-p", "5", "--max-nfev", "5", "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["success"] is False and out["status"] == 3
    assert out["n_grad_evals"] <= 5 + 2  # an integrator may finish the step it is in
    assert "max_nfev" in out["message"] and "max_nfev" in captured.err


def test_flow_help_lists_the_integrators_and_the_budgets(capsys):
    with pytest.raises(SystemExit) as info:
        main(["flow", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in METHOD_NAMES:
        assert name in text
    assert "--max-nfev" in text and "--max-seconds" in text and "--label-smoothing" in text
    assert "default_tolerances" in text  # --rtol's default comes from the integrator


def test_flow_per_class_must_be_counts(capsys):
    with pytest.raises(SystemExit) as info:
        main(["flow", "-C", "3", "-N", "8,x", "-p", "3", "--lam-w", "0.1", "--lam-h", "0.1"])
    assert info.value.code == 2
    assert "comma-separated per-class counts" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["flow", "train"])
def test_loss_choices_are_the_registered_losses(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "{mse,ce}" in text and "--label-smoothing" in text


def test_train_passes_loss_and_label_smoothing_to_the_config(capsys):
    args = ["train", "--loss", "ce", "--label-smoothing", "0.1", "--epochs", "1", "--show-defaults"]
    assert main(args) == 0
    config = _json(capsys)
    assert config["loss"] == "ce" and config["label_smoothing"] == 0.1 and config["epochs"] == 1


def test_quick_reproduce_writes_only_under_the_ignored_runs_directory(monkeypatch):
    """The README's quick start (``ufm reproduce --quick``) must leave tracked files alone; it
    overwrote the committed figures/ (18 modified files) before it defaulted to runs/reproduce-quick."""
    from pathlib import Path

    from ufm.experiments import reproduce as reproduce_module

    seen = {}

    def fake(out, **kwargs):  # records where the run would write, then stops the command
        seen["out"] = Path(out)
        raise ValueError("stop")

    monkeypatch.setattr(reproduce_module, "reproduce", fake)
    assert main(["reproduce", "--quick"]) == 2
    repo = Path(__file__).resolve().parents[1]
    assert not seen["out"].is_absolute() and seen["out"].parts[0] == "runs"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(seen["out"] / "report.md")], cwd=repo)
    if ignored.returncode == 128:  # not a git checkout (an sdist): read the rule instead
        assert "/runs/" in (repo / ".gitignore").read_text().split()
    else:
        assert ignored.returncode == 0


def test_the_modules_of_the_exports_are_reached_from_the_package():
    """``import ufm; ufm.dynamics.gradient_flow`` as NumPy's ``np.linalg``: the modules behind the
    exports are imported on first access (before: AttributeError unless imported by name)."""
    code = "import sys, ufm; assert 'ufm.dynamics' not in sys.modules; print(ufm.dynamics.gradient_flow is ufm.gradient_flow)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    import ufm

    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        ufm.nosuch  # noqa: B018


def test_version():
    import ufm

    done = subprocess.run([sys.executable, "-m", "ufm", "--version"], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"ufm {ufm.__version__}"


def test_closed_pipe_ends_quietly():
    """``ufm prove --latex ... | head -1``: the reader closes the pipe before the ~80 kB of output
    (more than a pipe buffers) are written; no traceback, status 1 (output cut short). The ETF proof
    200 times over makes that much output in about 4.5 s (every proof once: about 24 s)."""
    names = ["etf"] * 200
    proc = subprocess.Popen([sys.executable, "-m", "ufm", "prove", "--latex", "--wide", *names], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.readline().startswith(b"proof")
    proc.stdout.close()
    assert proc.wait(timeout=300) == 1
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("command", ["solve", "metrics", "train", "sweep", "prove", "reproduce", "flow"])
def test_every_subcommand_has_a_description(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 20, description
    assert all(len(line) <= 100 for line in text.splitlines())


def test_help_lists_the_choices(capsys):
    """Methods from METHODS, losses from LOSSES, proof keys from PROOFS: each --help lists them."""
    from ufm.dynamics import METHODS
    from ufm.losses import LOSSES
    from ufm.proofs import PROOFS

    for command, names in (("flow", [*METHODS, *LOSSES]), ("train", LOSSES), ("prove", PROOFS)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in names:
            assert name in text, (command, name)


def test_metrics_says_what_collapse_gives(tmp_path, capsys):
    import numpy as np

    from ufm import simplex_etf

    path = tmp_path / "f.npz"
    E = simplex_etf(3, 4)
    np.savez(path, features=np.repeat(E, 2, axis=0), labels=np.repeat(np.arange(3), 2), weight=E)
    assert main(["metrics", str(path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "at collapse" in lines["measure"]
    assert lines["nc1"].split()[-1] == "0" and lines["rank_means"].split()[-1] == "C-1"


# Issue 14, case (a), typed: C = 4, N = 5, lam = 0.02, lam_b = 1, delta = C sqrt(N) lam; the bias
# saturates (lam_b (1 - delta) > delta) and the minimal loss is delta - delta^2/2 - delta^2/(2 C lam_b)
# (docs/theory.md §6), attained at rank C, so in p = 4 the end point is neither an ETF nor a frame.
_DELTA_A = 4 * 5**0.5 * 0.02
REGULARIZED_BIAS_LOSS = _DELTA_A - _DELTA_A**2 / 2 - _DELTA_A**2 / 8


def test_flow_with_a_regularized_bias_reports_its_end_point(capsys):
    args = ["flow", "-C", "4", "-N", "5", "-p", "4", "--lam-w", "0.02", "--lam-h", "0.02", "--lam-b", "1"]
    assert main(args + ["--json"]) == 0
    out = _json(capsys)
    assert set(out) == FLOW_JSON_KEYS
    assert out["loss"] == pytest.approx(REGULARIZED_BIAS_LOSS, rel=FLOW_AGREEMENT)
    assert (out["geometry"], out["rank"], out["critical_point"]) == ("other", 4, "minimum")
    assert abs(out["hessian_min_eig"]) < 1e-8
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "other (rank 4)" in text and "end point: minimum" in text


def test_problem_flags_build_the_problem():
    """--depth, per-layer --lam-w (W_1 first), --lam-b, --loss and counts reach UFMProblem as given."""
    from ufm.cli import build_parser
    from ufm.commands import _problem

    args = build_parser().parse_args(
        ["flow", "-C", "3", "-N", "4,3,2", "-p", "3", "--depth", "2", "--lam-w", "0.01,0.02",
         "--lam-h", "0.03", "--lam-b", "0.5", "--loss", "ce"]
    )  # fmt: skip
    problem = _problem(args)
    assert (problem.depth, problem.lam_w, problem.lam_h, problem.lam_b) == (2, (0.01, 0.02), 0.03, 0.5)
    assert problem.counts == (4, 3, 2) and problem.loss.name == "ce" and problem.bias


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lam-w", "0.1,0.2"], "lam_w has 2 entries but depth = 1"),
        (["--lam-w", "0.1", "--lam-b", "1", "--no-bias"], "--no-bias"),
        (["--lam-w", "0.1", "--depth", "0"], "depth"),
    ],
)
def test_bad_problem_flags_are_exit_2_naming_the_flag(extra, message, capsys):
    assert main(["flow", "-C", "3", "-N", "2", "-p", "3", "--lam-h", "0.1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ufm flow: error:") and message in err


def test_lam_w_must_be_decays(capsys):
    with pytest.raises(SystemExit) as info:
        main(["flow", "-C", "3", "-N", "2", "-p", "3", "--lam-w", "0.1,x", "--lam-h", "0.1"])
    assert info.value.code == 2
    assert "comma-separated decays" in capsys.readouterr().err


# ``ufm solve`` flags for every model, on both sides of each threshold (issue 14's done-when grid):
# bias decay (saturated / carries the mean / zero), depth 2 and 3 (collapse / a root but zero wins),
# per-class counts with and without a bias (all fit / minority collapse), cross-entropy (ETF / zero).
SOLVE_GRID_FAST = [
    "-C 4 -N 5 --lam-w 0.02 --lam-h 0.02 --lam-b 1",
    "-C 3 -N 4 --lam-w 0.0833 --lam-h 0.0833 --depth 2",
    "-C 3 -N 8,4,2 --lam-w 0.12 --lam-h 0.12 --no-bias",
    "-C 4 -N 3 --lam-w 0.01 --lam-h 0.01 --loss ce",
]
SOLVE_GRID_SLOW = [
    "-C 4 -N 5 --lam-w 0.02 --lam-h 0.02 --lam-b 0.1",
    "-C 3 -N 2 --lam-w 0.5 --lam-h 0.5 --lam-b 1",
    "-C 3 -N 4 --lam-w 0.06 --lam-h 0.06 --depth 2",
    "-C 3 -N 4 --lam-w 0.09 --lam-h 0.09 --depth 2",
    "-C 3 -N 2 --lam-w 0.05,0.08,0.04 --lam-h 0.05 --depth 3",
    "-C 3 -N 2 --lam-w 0.12 --lam-h 0.12 --depth 3 --no-bias",
    "-C 3 -N 8,4,2 --lam-w 0.05 --lam-h 0.05 --no-bias",
    "-C 3 -N 8,4,2 --lam-w 0.03 --lam-h 0.03",
    "-C 3 -N 8,4,2 --lam-w 0.03 --lam-h 0.03 --depth 2",
    "-C 4 -N 3 --lam-w 0.01 --lam-h 0.01 --loss ce --no-bias",
    "-C 3 -N 2 --lam-w 0.3 --lam-h 0.3 --loss ce",
]


def _solve_agrees_with_verify(flags: str, capsys) -> dict:
    assert main(["solve", *flags.split(), "-p", "5", "--json", "--verify", "--starts", "6"]) == 0
    out = _json(capsys)
    gap = out["verify"]["loss_numeric"] - out["loss"]
    assert abs(gap) <= 1e-8 * max(out["loss"], 1e-12), (flags, out["regime"], gap)
    assert abs(out["verify"]["loss_built"] - out["loss"]) <= 1e-12 * max(out["loss"], 1)
    return out


@pytest.mark.parametrize("flags", SOLVE_GRID_FAST)
def test_solve_json_agrees_with_verify(flags, capsys):
    out = _solve_agrees_with_verify(flags, capsys)
    assert len(out["z_singular_values"]) == (4 if "-C 4" in flags else 3)
    assert out["z_singular_values"] == sorted(out["z_singular_values"], reverse=True)
    assert ("b" in out and out["b"] is not None) == ("--no-bias" not in flags)


@pytest.mark.slow
@pytest.mark.parametrize("flags", SOLVE_GRID_SLOW)
def test_solve_json_agrees_with_verify_full_grid(flags, capsys):
    _solve_agrees_with_verify(flags, capsys)


def test_solve_json_new_keys(capsys):
    assert main(["solve", "-C", "3", "-N", "8,4,2", "-p", "3", "--lam-w", "0.12", "--lam-h", "0.12",
                 "--no-bias", "--json"]) == 0  # fmt: skip
    out = _json(capsys)
    # n lam = 1.68 > sqrt(2): class 2 is sent to zero; the others keep sqrt(N_c) - n lam.
    assert out["regime"] == "minority_collapse"
    assert out["z_singular_values"] == pytest.approx([8**0.5 - 1.68, 4**0.5 - 1.68, 0.0], abs=1e-12)
    assert len(out["w_row_norm_sq"]) == 3 and out["w_row_norm_sq"][2] == 0
    assert out["geometry"] == "other" and out["rank"] == 2 and out["cos_w"] is None


def test_solve_zero_decay_says_infimum_not_attained(capsys):
    args = ["solve", *PROBLEM, "-p", "4"]
    args[args.index("--lam-w") + 1] = "0"
    assert main(args + ["--json"]) == 0
    out = _json(capsys)
    assert out["attained"] is False and "infimum not attained" in out["note"]
    assert out["w_row_norm_sq"] is None and out["h_norm_sq"] is None
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "infimum not attained" in text
    assert next(line for line in text.splitlines() if "||W_c||^2" in line).split()[-1] == "-"


def test_solve_lam_w_per_layer_must_match_depth(capsys):
    assert main(["solve", *PROBLEM, "-p", "4", "--lam-w", "0.1,0.2"]) == 2
    assert "lam_w has 2 entries but depth = 1" in capsys.readouterr().err
