"""Closed forms against numerical minimization, the built minimizer, and the poster's formulas."""

import json
import subprocess
import sys

import numpy as np
import pytest
from problems import ANSWER_FIELDS, BY_NAME
from scipy.optimize import minimize_scalar

from ufm.closed_form import (
    lemma1_alpha_star,
    lemma1_loss,
    sqi_cosine,
    sqi_w_row_norm_sq,
    sqi_w_scale,
    ufm_optimum,
)
from ufm.geometry import simplex_etf
from ufm.model import UFMParams, UFMProblem, loss, loss_and_grad, outputs
from ufm.optimize import check_optimum

REL_LOSS = 1e-8  # the agreement target between closed form and L-BFGS, relative in the loss

# (C, N, p, lam_w, lam_h): delta = C sqrt(N lam_w lam_h) spans both sides of the threshold delta = 1.
GRID = [
    (2, 3, 2, 0.02, 0.05),  # delta 0.11
    (3, 4, 4, 0.01, 0.02),  # delta 0.08
    (4, 3, 5, 0.05, 0.03),  # delta 0.27
    (5, 2, 6, 0.03, 0.06),  # delta 0.30
    (6, 2, 8, 0.01, 0.004),  # delta 0.054
    (3, 5, 3, 0.08, 0.1),  # delta 0.60
    (4, 2, 4, 0.1, 0.2),  # delta 0.80
    (3, 4, 4, 0.2, 0.15),  # delta 1.04 (zero)
    (5, 3, 6, 0.1, 0.1),  # delta 0.87
    (4, 5, 6, 0.3, 0.2),  # delta 2.19 (zero)
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("C", "N", "p", "lam_w", "lam_h"), GRID)
def test_closed_form_equals_numerical_minimum(C, N, p, lam_w, lam_h, bias):
    p = max(p, C)  # the bias-free minimizer needs p >= C
    chk = check_optimum(C, N, p, lam_w, lam_h, bias=bias, n_starts=3, seed=7)
    opt = chk.closed_form
    assert abs(chk.rel_gap) < REL_LOSS, (opt.delta, chk.numeric.losses)
    assert chk.loss_built == pytest.approx(opt.loss, rel=1e-12)
    # Its best end point is second-order stationary: a minimum by the Hessian's spectrum (at (6, 2,
    # 8, 0.01, 0.004) with a bias, Lanczos did not converge within its 20,000 products there).
    best = chk.numeric.ends[int(np.argmin(chk.numeric.losses))]
    assert best.critical_point == "minimum", best
    # The numerical minimizer has the predicted outputs and geometry, to L-BFGS accuracy.
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias)
    f = outputs(problem, chk.numeric.params)
    correct = f[problem.labels, np.arange(problem.n)]
    wrong = f[problem.Y == 0]
    np.testing.assert_allclose(correct, opt.f_correct, atol=1e-4)
    np.testing.assert_allclose(wrong, opt.f_other, atol=1e-4)
    W = chk.numeric.params.W
    row_sq = np.sum(W**2, axis=1)
    np.testing.assert_allclose(row_sq, opt.w_row_norm_sq, atol=1e-4 * max(1.0, opt.w_row_norm_sq))
    if opt.collapsed:
        cos = (W @ W.T / np.sqrt(np.outer(row_sq, row_sq)))[~np.eye(C, dtype=bool)]
        np.testing.assert_allclose(cos, opt.cos_w, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("C", [2, 3, 7, 20])
def test_built_minimizer_is_stationary(C, bias):
    """The exact (W, H, b) from the closed form has zero gradient and the formula's loss."""
    N, lam_w, lam_h = 3, 2e-3, 5e-3
    opt = ufm_optimum(C, N, lam_w, lam_h, bias=bias)
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias)
    params = opt.build(C + 3, rng=C)
    value, grad = loss_and_grad(problem, params)
    assert value == pytest.approx(opt.loss, rel=1e-12)
    assert np.linalg.norm(grad.ravel()) < 1e-12
    # NC3 with the predicted scale: W_c = w_scale mu_c, and mu_G = 0 with a bias.
    means = params.H.reshape(params.p, C, N).mean(axis=2).T  # (C, p)
    np.testing.assert_allclose(params.W, opt.w_scale * means, atol=1e-12)
    np.testing.assert_allclose(np.sum(means**2, axis=1), opt.h_norm_sq, rtol=1e-12)
    centred = means - means.mean(axis=0)
    cos = (centred @ centred.T / np.sum(centred**2, axis=1))[~np.eye(C, dtype=bool)]
    np.testing.assert_allclose(cos, opt.cos_h, atol=1e-12)
    if bias:
        np.testing.assert_allclose(means.mean(axis=0), 0.0, atol=1e-12)


@pytest.mark.parametrize("C", [2, 3, 5, 10])
def test_poster_theorem_agrees_with_derived_minimizer(C):
    """With lam_w = lam_h = lam and a bias, the global minimizer satisfies SQI, so the poster's theorem
    (written independently from dW_L/dt = 0) must reproduce its norm, scale and cosine."""
    N, lam = 4, 1e-3
    opt = ufm_optimum(C, N, lam, lam, bias=True)
    assert opt.f_other == pytest.approx(opt.eps / (C - 1), rel=1e-13)  # SQI
    assert sqi_w_row_norm_sq(C, opt.eps, lam) == pytest.approx(opt.w_row_norm_sq, rel=1e-12)
    assert sqi_w_scale(C, opt.eps, lam) == pytest.approx(opt.w_scale, rel=1e-12)
    assert sqi_cosine(C) == pytest.approx(opt.cos_w, rel=1e-14)


@pytest.mark.parametrize("C", [2, 3, 6, 11])
def test_lemma1_loss_and_minimizer(C):
    """Lemma 1: build H = M Y and W with W M = alpha C/(C-1)(I - 11^T/C); the model's unregularized
    loss equals the lemma's formula, and scalar minimization finds alpha* = (C-1)/C, L = 1/(2C)."""
    N = 3
    problem = UFMProblem(C, N, 0.0, 0.0, bias=False)
    M = simplex_etf(C, C + 1, rng=0)  # (C, p) rows: class means, mu_G = 0, unit norms
    H = M[problem.labels].T  # (p, n)

    def model_loss(alpha):
        return loss(problem, UFMParams(H, (alpha * M,), None))  # W M^T = alpha C/(C-1)(I - J/C)

    for alpha in [0.0, 0.3, 1.0, 1.7]:
        assert model_loss(alpha) == pytest.approx(lemma1_loss(C, alpha), rel=1e-13)
    res = minimize_scalar(model_loss, bracket=(0, 1), tol=1e-12)
    assert res.x == pytest.approx(lemma1_alpha_star(C), abs=1e-6)
    assert res.fun == pytest.approx(1 / (2 * C), rel=1e-10)
    assert lemma1_loss(C, lemma1_alpha_star(C)) == pytest.approx(1 / (2 * C), rel=1e-14)


def test_threshold_and_zero_solution():
    C, N = 4, 5
    bound = ufm_optimum(C, N, 0.01, 0.01).lam_product_max
    assert bound == pytest.approx(1 / (N * C**2))
    below = ufm_optimum(C, N, np.sqrt(0.99 * bound), np.sqrt(0.99 * bound))
    above = ufm_optimum(C, N, np.sqrt(1.01 * bound), np.sqrt(1.01 * bound))
    assert below.collapsed and below.geometry == "simplex_etf"
    assert not above.collapsed and above.geometry == "zero" and above.cos_w is None
    assert above.loss == pytest.approx((C - 1) / (2 * C))
    # The loss is continuous across the threshold.
    at = ufm_optimum(C, N, np.sqrt(bound * (1 - 1e-12)), np.sqrt(bound * (1 - 1e-12)))
    assert at.loss == pytest.approx(above.loss, rel=1e-9)


def test_unregularized_limit_interpolates():
    opt = ufm_optimum(3, 4, 0.0, 0.0)
    assert opt.eps == 0 and opt.loss == 0 and opt.attained
    problem = UFMProblem(3, 4, 0.0, 0.0)
    assert loss(problem, opt.build(3)) == pytest.approx(0.0, abs=1e-28)
    with pytest.raises(ValueError, match="not attained"):
        ufm_optimum(3, 4, 0.0, 0.1).build(3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ufm_optimum(1, 3, 0.1, 0.1), "C must be"),
        (lambda: ufm_optimum(3, 0, 0.1, 0.1), "N must be"),
        (lambda: ufm_optimum(3, 2, -1, 0.1), "lam_w"),
        (lambda: ufm_optimum(3, 2, 0.1, float("inf")), "lam_h"),
        (lambda: ufm_optimum(5, 2, 0.01, 0.01).build(3), "p >= 4"),
        (lambda: ufm_optimum(5, 2, 0.01, 0.01, bias=False).build(4), "p >= 5"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ufm", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("C", "N", "p", "lam_w", "lam_h"), GRID[::3])
@pytest.mark.parametrize("bias", [True, False])
def test_cli_solve_json_agrees_with_minimization(C, N, p, lam_w, lam_h, bias):
    p = max(p, C)
    args = ["solve", "--classes", str(C), "--per-class", str(N), "--dim", str(p),
            "--lam-w", str(lam_w), "--lam-h", str(lam_h), "--json", "--verify", "--starts", "3"]  # fmt: skip
    out = _cli(*args, *([] if bias else ["--no-bias"]))
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    for key in ["eps", "f_correct", "f_other", "loss", "collapsed", "geometry", "cos_w"]:
        assert key in obj
    assert abs(obj["verify"]["loss_numeric"] - obj["loss"]) <= REL_LOSS * obj["loss"]
    assert obj["geometry"] in ("simplex_etf", "orthogonal_frame", "zero")


# One catalogue case per geometry (tests/problems.py): the JSON carries the typed answers.
CLI_CASES = ["etf_C4", "orth_C4", "smooth_frame_C3", "rank_one_C3", "zero_C3_bias_smooth"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_solve_json_gives_typed_answers(name):
    case = BY_NAME[name]
    args = ["solve", "-C", str(case.C), "-N", str(case.N), "-p", str(case.p), "--lam-w", str(case.lam_w),
            "--lam-h", str(case.lam_h), "--label-smoothing", str(case.label_smoothing), "--json"]  # fmt: skip
    out = _cli(*args, *([] if case.bias else ["--no-bias"]))
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert obj["geometry"] == case.geometry
    for key in ANSWER_FIELDS:
        expected = getattr(case, key)
        if expected is None:
            assert obj[key] is None, key
        else:
            assert obj[key] == pytest.approx(expected, rel=1e-12, abs=1e-15), key


def test_cli_solve_table_and_errors():
    out = _cli("solve", "-C", "4", "-N", "3", "-p", "5", "--lam-w", "0.01", "--lam-h", "0.01")
    assert out.returncode == 0 and "simplex_etf" in out.stdout and "minimal loss" in out.stdout
    bad = _cli("solve", "-C", "6", "-N", "3", "-p", "3", "--lam-w", "0.01", "--lam-h", "0.01")
    assert bad.returncode == 2 and "below 5" in bad.stderr
    bad = _cli("solve", "-C", "6", "-N", "3", "-p", "8", "--lam-w", "nan", "--lam-h", "0.01")
    assert bad.returncode == 2 and "lam_w" in bad.stderr
