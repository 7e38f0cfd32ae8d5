"""The main job in quick mode: every part runs, and the report's numbers come from its CSV tables."""

import json
import re
import subprocess
import sys

import pytest

from ufm.closed_form import ufm_optimum
from ufm.experiments.reproduce import FLOW_AGREEMENT, reproduce
from ufm.tables import read_csv


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return reproduce(tmp_path_factory.mktemp("figures"), quick=True, progress=False)


def test_parts_succeed(result):
    assert result.proofs_verified == result.proofs_total > 0
    assert result.flows_agree
    for f in result.figures:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in result.tables:
        assert read_csv(t), t


def test_flows_match_an_independent_closed_form(result):
    """Each flow's end point against ufm_optimum recomputed here (not the value stored beside it),
    integrated with the library's default method."""
    from ufm.dynamics import DEFAULT_METHOD

    for row in read_csv(result.out / "flows.csv"):
        opt = ufm_optimum(row["C"], row["N"], row["lam"], row["lam"], bias=row["bias"])
        assert row["loss_flow"] == pytest.approx(opt.loss, rel=FLOW_AGREEMENT)
        assert row["eps_flow"] == pytest.approx(opt.eps, rel=FLOW_AGREEMENT)
        if opt.collapsed:
            assert row["cos_w_flow"] == pytest.approx(opt.cos_w, abs=1e-6)
        assert row["reached"] is True and row["method"] == DEFAULT_METHOD
    assert f"integrated with {DEFAULT_METHOD} (the library's default" in result.report.read_text()


def test_phase_diagram_crosses_the_threshold(result):
    rows = read_csv(result.out / "phase.csv")
    below = [r for r in rows if r["lam_over_lam_star"] < 1]
    above = [r for r in rows if r["lam_over_lam_star"] > 1]
    assert below and above
    assert all(r["w_row_norm_sq_flow"] > 1e-3 for r in below)
    assert all(r["w_row_norm_sq_flow"] < 1e-8 for r in above)


def test_report_numbers_come_from_the_tables(result):
    text = result.report.read_text()
    for name in ("flows.png", "phase.png", "network/nc_weight_decay.png"):
        assert f"]({name})" in text
    for row in read_csv(result.out / "flows.csv"):
        assert f"{row['eps_flow']:.4g}" in text
        assert f"{row['loss_theory']:.4g}" in text
    for row in read_csv(result.out / "network" / "theory_vs_measurement.csv"):
        assert f"{row['nc3']:.4g}" in text
    n = len(read_csv(result.out / "proofs.csv"))
    assert re.search(rf"{n}/{n} verified", text)


@pytest.mark.slow
def test_cli_quick(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ufm", "reproduce", "--quick", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["success"] and summary["proofs_verified"] == summary["proofs_total"]


def test_report_carries_the_proofs_latex(result):
    """Each proof's formulas, LaTeX from ``ufm prove --latex`` (proofs.csv's latex column), are in
    report.md below the proof table, linked from it."""
    from ufm.experiments.reproduce import LATEX_SEPARATOR

    text = result.report.read_text()
    rows = read_csv(result.out / "proofs.csv")
    with_formulas = [r for r in rows if r["latex"]]
    # theorem_nc1's and moment_closure's claims are reduced to 0 = 0 when built, the numeric check has
    # no formula: those three carry none.
    assert {r["key"] for r in rows if not r["latex"]} <= {
        "theorem_nc1",
        "label_smoothing_numeric",
        "moment_closure",
    }
    for r in with_formulas:
        formulas = r["latex"].split(LATEX_SEPARATOR)
        assert f"[{len(formulas)} formulas](#formulas-{r['key']})" in text
        assert all(f"$$ {f} $$" in text for f in formulas)


def test_each_part_prints_a_line_with_its_time(capsys):
    from ufm.experiments.reproduce import _PartLog

    with _PartLog(True)("2/4 flows"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "reproduce: 2/4 flows ..." and re.fullmatch(
        r"reproduce: 2/4 flows: done in \d+ s", err[1]
    )


def test_minimizer_phase_diagrams_cross_each_threshold(result):
    """Part 5: the flows end at the closed form on both sides of each threshold (docs/theory.md §6-§8)."""
    rows = read_csv(result.out / "minimizer_phases.csv")
    regimes = {d: {r["regime"] for r in rows if r["diagram"] == d} for d in ("lam_b", "depth", "minority")}
    assert {"collapse", "collapse_bias_saturated"} <= regimes["lam_b"]
    assert "collapse" in regimes["depth"] and any(g.startswith("zero") for g in regimes["depth"])
    assert {"collapse", "minority_collapse"} <= regimes["minority"]
    assert all(r["reached"] for r in rows), [(r["diagram"], r["x"]) for r in rows if not r["reached"]]
    for r in rows:
        assert abs(r["loss_flow"] - r["loss_theory"]) <= 1e-6 * r["loss_theory"]


def test_low_rank_part_reads_the_network_runs(result):
    """Part 7: one row per (run, epoch, layer) of part 4's runs, ranks within their bounds, and the
    report states W_L's rank out of C from the table."""
    from ufm.experiments.low_rank import LOW_RANK_CSV

    rows = read_csv(result.out / LOW_RANK_CSV)
    network = read_csv(result.out / "network" / "theory_vs_measurement.csv")
    assert {r["wd"] for r in rows} == {r["wd"] for r in network}
    for r in rows:
        assert 1 - 1e-12 <= r["stable_rank"] <= r["rank"] + 1e-12 <= r["n_sv"] + 1e-12
        assert 1 - 1e-12 <= r["effective_rank"] <= r["n_sv"] + 1e-12
    text = result.report.read_text()
    last = max(r["epoch"] for r in rows)
    for r in rows:
        if r["epoch"] == last and r["refined"] == 0 and r["layer"] == 3:
            assert f"has {r['rank']} of {r['n_sv']} singular values above RANK_RTOL" in text
    assert "](low_rank.png)" in text


def test_normalization_part_measures_rho_of_both_architectures(result):
    """Part 8: rho = prod rho_k to 1e-10 on every row, both architectures with and without weight
    decay, and the report's ratio rho_CNN / rho_MLP computed from the table's last rows."""
    from math import prod

    from ufm.experiments.normalization import DEPTH, NORM_WDS, NORMALIZATION_CSV

    rows = read_csv(result.out / NORMALIZATION_CSV)
    assert {(r["arch"], r["wd"]) for r in rows} == {(a, w) for a in ("mlp", "cnn") for w in NORM_WDS}
    for r in rows:
        assert r["rho"] == pytest.approx(prod(r[f"rho_{k}"] for k in range(1, DEPTH + 1)), rel=1e-10)
    text = result.report.read_text()
    for wd in NORM_WDS:
        last = {a: [r for r in rows if r["arch"] == a and r["wd"] == wd][-1] for a in ("mlp", "cnn")}
        assert f"rho_CNN / rho_MLP = {last['cnn']['rho'] / last['mlp']['rho']:.3g}" in text
    assert "](normalization.png)" in text


def test_sgd_noise_part(result):
    """Part 9 (docs/theory.md §16.1): the windows stay at quasi-interpolation and past the transient,
    the fixed-order part grows with the learning rate, the two estimates of the sampling part agree to
    a factor 2, and the report quotes the table."""
    rows = read_csv(result.out / "sgd_noise.csv")
    assert {r["wd"] for r in rows} == {0.0, 5e-3}
    for r in rows:
        assert r["train_acc"] == 1.0
        assert 0.8 < r["fixed_settle"] < 1.25, r
        if r["sampling"] is not None:
            assert 0.5 < r["sampling"] / r["between"] < 2, r
    for wd in (0.0, 5e-3):
        for q in ("W1", "W3", "out"):
            sweep = sorted(
                (r["lr"], r["fixed"]) for r in rows if (r["wd"], r["quantity"], r["sweep"]) == (wd, q, "lr")
            )
            assert len(sweep) == 3 and all(a[1] < b[1] for a, b in zip(sweep, sweep[1:])), sweep
    text = result.report.read_text()
    assert "Intrinsic SGD noise" in text and "](sgd_noise.png)" in text
    assert all(f"{r['fixed']:.3g}" in text for r in rows if r["quantity"] == "out")
