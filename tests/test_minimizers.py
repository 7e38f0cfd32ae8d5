"""The literature's minimizers (issue 14, models 1-4), each checked three ways: against the formula
typed out here from docs/theory.md §6-§9 (not the library's code), against L-BFGS from random starts
(``ufm.optimize.minimize_loss``), and against gradient flow from random starts.

Typed-out formulas (delta = C sqrt(N lam_w lam_h), balanced, a = 0 unless said):

* §6, bias decay lam_b: centred cost (C-1)/C (delta - delta^2/2); mean cost
  (delta - delta^2/2 - delta^2/(2 lam_b))/C with b = delta/(lam_b C) if lam_b (1 - delta) > delta,
  else lam_b/(2C(1 + lam_b)) with b = 1/(C(1 + lam_b)).
* §7, m = L + 1 factors, c = (lam_h prod lam_k)^(1/m), target value S = sqrt(N): a kept value s solves
  (S - s) s^(1 - 2/m) = n c, costs (S - s)(S + (m-1) s)/(2n), and is kept iff s > (m-2) S/(m-1).
* §8, no bias, counts N_c, depth 1, tau = sqrt(lam_w lam_h): s_c = (sqrt(N_c) - n tau)_+, loss
  sum_c [tau sqrt(N_c) - n tau^2/2 if kept, else N_c/(2n)].
* §9, cross-entropy: eps = (C-1) delta/C, x = log((C-1)(1 - eps)/eps), loss -log(1 - eps) + eps x.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ufm.dynamics import gradient_flow
from ufm.geometry import frame_distance, mean_cosine
from ufm.model import UFMParams, UFMProblem, loss, loss_and_grad, outputs
from ufm.optimize import minimize_loss, verify_optimum

# L-BFGS stops at a relative decrease of 1e-15 (ufm.optimize.FTOL); the issue asks 1e-8 in the loss.
LBFGS_AGREEMENT = 1e-8
# The flow stops at ||grad L|| < 1e-9; its loss is then within ~1e-16 of the minimum's, its
# parameters within ~1e-9 / (smallest Hessian eigenvalue) of it.
FLOW_TOL = 1e-9
FLOW_AGREEMENT = 1e-6


def _lbfgs_gap(problem: UFMProblem, starts: int = 4, seed: int = 0) -> tuple[float, float]:
    chk = verify_optimum(problem, problem.C + 1, n_starts=starts, seed=seed)
    return chk.closed_form.loss, chk.numeric.loss


def _flow_end(problem: UFMProblem, seed: int, p: int | None = None):
    start = UFMParams.random(problem, p or problem.C + 1, rng=seed)
    r = gradient_flow(problem, start, tol=FLOW_TOL, metrics=False, n_records=2)
    assert r.success, r.message
    return r.params


# --- model 1: regularized bias -------------------------------------------------------------------


def _bias_typed(C, N, lam, lam_b):
    delta = C * math.sqrt(N) * lam
    centred = (C - 1) / C * (delta - delta**2 / 2)
    if lam_b * (1 - delta) > delta:
        return centred + (delta - delta**2 / 2 - delta**2 / (2 * lam_b)) / C, delta / (lam_b * C)
    return centred + lam_b / (2 * C * (1 + lam_b)), 1 / (C * (1 + lam_b))


@pytest.mark.parametrize("lam_b", [0.1, 0.5, 1.0, 4.0])
def test_regularized_bias_closed_form_is_the_typed_formula_and_lbfgs(lam_b):
    """C = 4, N = 5, lam = 0.02 (delta = 0.179): lam_b = 0.1 is on the 'bias carries the mean' side
    (boundary lam_b/(1 + lam_b) = 0.09 < delta), the others on the saturated side."""
    problem = UFMProblem(4, 5, 0.02, 0.02, lam_b=lam_b)
    opt = problem.loss.closed_form(problem)
    want_loss, want_b = _bias_typed(4, 5, 0.02, lam_b)
    assert opt.loss == pytest.approx(want_loss, rel=1e-13)
    assert opt.b == pytest.approx([want_b] * 4, rel=1e-13)
    assert opt.geometry == ("simplex_etf" if lam_b == 0.1 else "other")
    cf, numeric = _lbfgs_gap(problem)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_regularized_bias_issue_example_is_not_the_etf_point():
    """The issue's example (C=4, N=5, lam=0.02, lam_b=1): the minimum 0.15889 lies below the ETF point
    with beta = 1/(C(1 + lam_b)) (loss 0.18466 by the reduced flow), and its rows are not an ETF."""
    problem = UFMProblem(4, 5, 0.02, 0.02, lam_b=1.0)
    opt = problem.loss.closed_form(problem)
    assert opt.loss == pytest.approx(0.158885438199983, rel=1e-12)
    assert opt.regime == "collapse_bias_saturated" and opt.rank == 4
    params = opt.build(5, rng=3)
    assert mean_cosine(params.W) > -1 / 3 + 0.2  # far from the ETF's -1/3


def test_regularized_bias_flow_from_random_starts_reaches_it():
    problem = UFMProblem(3, 2, 0.05, 0.05, lam_b=1.0)
    opt = problem.loss.closed_form(problem)
    for seed in (0, 1):
        end = _flow_end(problem, seed)
        assert loss(problem, end) == pytest.approx(opt.loss, rel=FLOW_AGREEMENT)
        np.testing.assert_allclose(end.b, opt.b, atol=FLOW_AGREEMENT)
        assert mean_cosine(end.W) == pytest.approx(opt.cos_w, abs=FLOW_AGREEMENT)


# --- model 2: deep linear ------------------------------------------------------------------------


def _deep_root(S, nc, m):
    """The larger root of (S - s) s^(1 - 2/m) = nc by bisection, typed here (not the library's)."""
    lo, hi = (m - 2) * S / (2 * (m - 1)), S
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (S - mid) * mid ** (1 - 2 / m) > nc else (lo, mid)
    return lo


@pytest.mark.parametrize("depth", [2, 3])
def test_deep_threshold_compares_the_root_with_zero(depth):
    """C = 3, N = 4, bias, equal decays: below the threshold c_t the root is kept; between c_t and the
    root limit a root exists but zero wins (the case the issue asks to show); the closed form agrees
    with the typed formula on both sides and L-BFGS agrees with it."""
    C, N, m = 3, 4, depth + 1
    S, n = math.sqrt(N), C * N
    s_t = (m - 2) * S / (m - 1)
    c_t = (S - s_t) * s_t ** (1 - 2 / m) / n
    s_max = (m - 2) * S / (2 * (m - 1))
    c_max = (S - s_max) * s_max ** (1 - 2 / m) / n
    assert c_t < c_max
    for c, kept in ((0.7 * c_t, True), (0.5 * (c_t + c_max), False)):
        problem = UFMProblem(C, N, c, c, depth=depth)
        opt = problem.loss.closed_form(problem)
        s = _deep_root(S, n * c, m)
        root_loss = (C - 1) * (S - s) * (S + (m - 1) * s) / (2 * n)
        zero_loss = (C - 1) * S**2 / (2 * n)
        assert (root_loss < zero_loss) == kept
        assert opt.loss == pytest.approx(min(root_loss, zero_loss), rel=1e-12)
        assert opt.zero_wins_over_root == (not kept)
        assert opt.regime == ("collapse" if kept else "zero_zero_wins_over_root")
        cf, numeric = _lbfgs_gap(problem, starts=4)
        assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_deep_balance_and_per_layer_norms():
    """Depth 2, decays (0.02, 0.05) and lam_h = 0.03: lam_k ||W_k||^2 = lam_h ||H||^2 at the built
    minimizer, which is stationary; its rows are a simplex ETF."""
    problem = UFMProblem(3, 4, (0.02, 0.05), 0.03, depth=2)
    opt = problem.loss.closed_form(problem)
    balance = [lam * v for lam, v in zip(problem.lam_layers, opt.layer_norm_sq)]
    assert balance == pytest.approx([problem.lam_h * opt.h_total_norm_sq] * 2, rel=1e-12)
    params = opt.build(4, rng=1)
    assert np.abs(loss_and_grad(problem, params)[1].ravel()).max() < 1e-12
    assert frame_distance(params.W, "simplex_etf") < 1e-7  # sqrt(2 - 2 x): float64 gives ~1e-8


@pytest.mark.parametrize("bias", [True, False])
def test_deep_flow_from_random_starts_reaches_it(bias):
    problem = UFMProblem(3, 2, 0.03, 0.03, depth=2, bias=bias)
    opt = problem.loss.closed_form(problem)
    assert opt.collapsed
    reached = 0
    for seed in range(3):
        end = _flow_end(problem, seed)
        reached += abs(loss(problem, end) - opt.loss) <= FLOW_AGREEMENT * opt.loss
        assert loss(problem, end) >= opt.loss - 1e-12  # never below the global minimum
    assert reached >= 2


# --- model 3: imbalanced classes -----------------------------------------------------------------


def _imbalanced_typed(counts, lam):
    n = sum(counts)
    total, kept = 0.0, []
    for Nc in counts:
        s = math.sqrt(Nc) - n * lam
        kept.append(s > 0)
        total += (math.sqrt(Nc) * n * lam - (n * lam) ** 2 / 2) / n if s > 0 else Nc / (2 * n)
    return total, kept


@pytest.mark.parametrize("lam", [0.02, 0.06, 0.1, 0.2])
def test_minority_collapse_depth_1_no_bias(lam):
    """Counts (8, 4, 2), no bias: class c is sent to zero once n lam >= sqrt(N_c), i.e. at lam = 0.101
    (class 2), 0.143 (class 1), 0.202 (class 0); losses typed out and checked by L-BFGS."""
    problem = UFMProblem(3, (8, 4, 2), lam, lam, bias=False)
    opt = problem.loss.closed_form(problem)
    want, kept = _imbalanced_typed((8, 4, 2), lam)
    assert opt.loss == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(np.array(opt.w_row_norm_sq) > 1e-12, kept)
    assert opt.regime == ("collapse" if all(kept) else "minority_collapse" if any(kept) else "zero")
    cf, numeric = _lbfgs_gap(problem)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_imbalanced_with_bias_is_labelled_numerical_and_agrees_with_lbfgs():
    problem = UFMProblem(3, (8, 4, 2), 0.03, 0.03)
    opt = problem.loss.closed_form(problem)
    assert opt.spectrum == "numerical" and opt.regime.endswith("_numerical_spectrum")
    # The bias is the mean target of each class, N_c/n.
    assert opt.b == pytest.approx([8 / 14, 4 / 14, 2 / 14], rel=1e-12)
    cf, numeric = _lbfgs_gap(problem)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_imbalanced_flow_from_random_starts_reaches_it():
    problem = UFMProblem(3, (6, 3, 1), 0.11, 0.11, bias=False)  # n lam = 1.1 > 1 = sqrt(N_2): class 2 at 0
    opt = problem.loss.closed_form(problem)
    assert opt.regime == "minority_collapse"
    for seed in (0, 1):
        end = _flow_end(problem, seed)
        assert loss(problem, end) == pytest.approx(opt.loss, rel=FLOW_AGREEMENT)
        np.testing.assert_allclose((end.W**2).sum(axis=1), opt.w_row_norm_sq, atol=FLOW_AGREEMENT)


def test_deep_imbalanced_agrees_with_lbfgs():
    problem = UFMProblem(3, (8, 4, 2), 0.03, 0.03, depth=2)
    cf, numeric = _lbfgs_gap(problem, starts=4)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


# --- model 4: cross-entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_cross_entropy_scale_is_the_typed_formula(bias):
    C, N, lam = 4, 3, 0.01
    problem = UFMProblem(C, N, lam, lam, loss="ce", bias=bias)
    opt = problem.loss.closed_form(problem)
    delta = C * math.sqrt(N) * lam
    eps = (C - 1) * delta / C
    x = math.log((C - 1) * (1 - eps) / eps)
    assert opt.loss == pytest.approx(-math.log(1 - eps) + eps * x, rel=1e-13)
    assert opt.f_correct - opt.f_other == pytest.approx(x, rel=1e-13)
    assert opt.f_correct == pytest.approx((C - 1) / C * math.log((C - (C - 1) * delta) / delta), rel=1e-13)
    params = opt.build(C, rng=0)
    f = outputs(problem, params)
    assert f[problem.labels, np.arange(problem.n)].mean() == pytest.approx(opt.f_correct, rel=1e-12)
    cf, numeric = _lbfgs_gap(problem)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_cross_entropy_threshold_zero_side():
    problem = UFMProblem(3, 2, 0.3, 0.3, loss="ce")  # delta = 3 sqrt(2) 0.3 = 1.27 > 1
    opt = problem.loss.closed_form(problem)
    assert opt.geometry == "zero" and opt.loss == pytest.approx(math.log(3), rel=1e-14)
    cf, numeric = _lbfgs_gap(problem)
    assert abs(numeric - cf) <= LBFGS_AGREEMENT * cf


def test_cross_entropy_flow_from_random_starts_reaches_it():
    problem = UFMProblem(3, 2, 0.02, 0.02, loss="ce")
    opt = problem.loss.closed_form(problem)
    for seed in (0, 1):
        end = _flow_end(problem, seed)
        assert loss(problem, end) == pytest.approx(opt.loss, rel=FLOW_AGREEMENT)
        assert mean_cosine(end.W) == pytest.approx(-0.5, abs=FLOW_AGREEMENT)


def test_minimize_loss_is_independent_of_the_closed_form():
    """minimize_loss sees only the problem: its best loss from random starts lands on the closed form
    without being given it (sanity of the helper used above)."""
    problem = UFMProblem(3, 2, 0.05, 0.05, lam_b=0.5)
    r = minimize_loss(problem, 4, n_starts=3, seed=5)
    assert r.loss == pytest.approx(problem.loss.closed_form(problem).loss, rel=LBFGS_AGREEMENT)


@pytest.mark.parametrize(("bias", "a"), [(True, 0.0), (False, 0.0), (True, 0.2), (False, 0.2)])
def test_deep_route_at_depth_1_matches_the_depth_1_closed_form(bias, a):
    """Two routes to the balanced depth-1 minimizer: ufm_optimum (the I/J algebra of §5) and
    deep_optimum (numerical SVD of the targets, scalar threshold per singular value, m = 2)."""
    from ufm.closed_form_deep import deep_optimum

    problem = UFMProblem(4, 3, 0.03, 0.05, bias=bias, label_smoothing=a)
    want = problem.loss.closed_form(problem)
    got = deep_optimum(problem)
    assert got.loss == pytest.approx(want.loss, rel=1e-12)
    assert got.eps == pytest.approx(want.eps, rel=1e-12)
    assert got.z_singular_values == pytest.approx(want.z_singular_values, rel=1e-12, abs=1e-14)
    assert got.w_row_norm_sq == pytest.approx(want.w_row_norm_sq, rel=1e-10)
    assert got.cos_w == pytest.approx(want.cos_w, rel=1e-9, abs=1e-12)


def test_cross_entropy_zero_decay_without_smoothing_is_refused():
    problem = UFMProblem(3, 2, 0.0, 0.1, loss="ce")
    with pytest.raises(ValueError, match="infimum not attained"):
        problem.loss.closed_form(problem)
