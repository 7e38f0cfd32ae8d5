"""Every route to the global minimizer reaches the catalogue's typed answers (tests/problems.py).

Routes (STYLE.md, "three routes to the same answer"): the closed form (``ufm_optimum`` and the loss
object's ``closed_form``), the exact minimizer it builds, L-BFGS from random starts, and the long-time
limit of gradient flow; the NC metrics of the built minimizer, in float32 and float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import ANSWER_FIELDS, BY_NAME, CASES, COLLAPSED, DTYPES, TOLERANCES

from ufm import nc_metrics
from ufm.closed_form import ufm_optimum
from ufm.dynamics import gradient_flow
from ufm.model import UFMParams, UFMProblem, loss, loss_and_grad
from ufm.optimize import minimize_loss

RTOL_CLOSED_FORM = 1e-12  # the typed answers carry 16 digits; the closed form is a few operations
ATOL_ZERO = 1e-15  # typed zeros (f_other, cos_w at a = 0, nc3 with a bias) are exact in the formulas
GRAD_TOL = 1e-10  # ||grad L|| at the built minimizer: rounding of O(1) entries, summed over <= 10^3
RTOL_LBFGS = 1e-8  # the agreement target between closed form and L-BFGS, relative in the loss
RTOL_FLOW = 1e-6  # gradient flow's long-time limit, relative in the loss

# The torch loss test uses tiny tensors: threads gain nothing there (conftest's one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Gradient flow from a random start on a cheap case of each regime (about a second each here);
# the rest run with -m slow. Near a threshold the slowest mode relaxes at a rate ~ |delta - threshold|.
FLOW_CHEAP = ("etf_C4", "orth_C4", "zero_C4_nobias", "smooth_etf_C4", "smooth_frame_C3")
FLOW_CASES = [
    pytest.param(case, id=case.name, marks=() if case.name in FLOW_CHEAP else pytest.mark.slow)
    for case in CASES
]


def _assert_answer(got, expected, name, case):
    if expected is None:
        assert got is None, (case.name, name, got)
    else:
        assert got == pytest.approx(expected, rel=RTOL_CLOSED_FORM, abs=ATOL_ZERO), (case.name, name)


# ---------------------------------------------------------------- closed form
@pytest.mark.parametrize("route", ["ufm_optimum", "loss.closed_form"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_closed_form_gives_typed_answers(case, route):
    """ufm_optimum and problem.loss.closed_form(problem) both return the hand-derived minimizer."""
    if route == "ufm_optimum":
        opt = ufm_optimum(
            case.C, case.N, case.lam_w, case.lam_h, bias=case.bias, label_smoothing=case.label_smoothing
        )
    else:
        problem = case.problem()
        opt = problem.loss.closed_form(problem)
    assert opt.geometry == case.geometry
    assert opt.label_smoothing == case.label_smoothing
    for name in ANSWER_FIELDS:
        _assert_answer(getattr(opt, name), getattr(case, name), name, case)


def test_imbalanced_problem_closed_form_says_its_spectrum_is_numerical():
    """With a bias the centred targets of per-class counts have no typed-out spectrum: the square-loss
    closed form computes it numerically and says so; cross-entropy refuses the counts by name."""
    problem = UFMProblem(C=4, N=(8, 4, 2, 1), lam_w=0.01, lam_h=0.01)
    assert problem.counts == (8, 4, 2, 1) and problem.n == 15
    assert problem.loss.closed_form(problem).spectrum == "numerical"
    with pytest.raises(ValueError, match="balanced classes"):
        _ = problem.N_balanced
    ce = UFMProblem(C=4, N=(8, 4, 2, 1), lam_w=0.01, lam_h=0.01, loss="ce")
    with pytest.raises(ValueError, match="per-class counts"):
        ce.loss.closed_form(ce)


# ---------------------------------------------------------------- the built minimizer
def _cosines(V):
    """Off-diagonal cosines of the rows of V (C, p), from an explicit Gram matrix."""
    norms = np.sqrt(np.sum(V * V, axis=1))
    G = V @ V.T / np.outer(norms, norms)
    return G[~np.eye(len(V), dtype=bool)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_built_minimizer_has_typed_loss_and_zero_gradient(case):
    """opt.build(p) is a stationary point with the typed loss, outputs, row norms and cosines
    (measured here with NumPy from W, H and b, not by the library)."""
    problem = case.problem()
    params = ufm_optimum(
        case.C, case.N, case.lam_w, case.lam_h, bias=case.bias, label_smoothing=case.label_smoothing
    ).build(case.p, rng=7)
    assert loss(problem, params) == pytest.approx(case.loss, rel=RTOL_CLOSED_FORM)
    value, grad = loss_and_grad(problem, params)
    assert value == pytest.approx(case.loss, rel=RTOL_CLOSED_FORM)
    assert np.linalg.norm(grad.ravel()) < GRAD_TOL

    W, H, b = params.W, params.H, params.b
    y = np.repeat(np.arange(case.C), case.N)
    f = W @ H + (0.0 if b is None else b[:, None])  # (C, n)
    on_class = np.eye(case.C, dtype=bool)[:, y]
    np.testing.assert_allclose(f[on_class], case.f_correct, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f[~on_class], case.f_other, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.sum(W**2, axis=1), case.w_row_norm_sq, rtol=1e-12, atol=1e-14)
    means = np.stack([H[:, y == c].mean(axis=1) for c in range(case.C)])  # (C, p)
    np.testing.assert_allclose(np.sum(means**2, axis=1), case.h_norm_sq, rtol=1e-12, atol=1e-14)
    if case.cos_w is not None:
        np.testing.assert_allclose(_cosines(W), case.cos_w, atol=1e-12)
    if case.cos_h is not None:
        np.testing.assert_allclose(_cosines(means - means.mean(axis=0)), case.cos_h, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_loss_at_built_minimizer(case, dtype):
    """The loss object's torch value at the built minimizer, cast to dtype, plus the weight decay
    (typed here), is the typed loss within that dtype's tolerance."""
    problem = case.problem()
    params = problem.loss.closed_form(problem).build(case.p, rng=3)
    W = torch.tensor(params.W, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    H = torch.tensor(params.H, dtype=W.dtype)
    f = (W @ H).T  # (n, C)
    if params.b is not None:
        f = f + torch.tensor(params.b, dtype=W.dtype)
    labels = torch.as_tensor(problem.labels, dtype=torch.int64)
    total = problem.loss.torch_value(f, labels, case.C)
    total = total + case.lam_w / 2 * (W**2).sum() + case.lam_h / 2 * (H**2).sum()
    assert total.dtype == W.dtype
    assert float(total) == pytest.approx(case.loss, rel=TOLERANCES[dtype]["loss_rtol"])


# ---------------------------------------------------------------- numerical routes
@pytest.mark.parametrize("case", CASES, ids=str)
def test_lbfgs_reaches_typed_loss(case):
    """L-BFGS from random starts in dimension p finds the typed minimal loss (no better point)."""
    res = minimize_loss(case.problem(), case.p, n_starts=2, seed=11)
    assert res.loss == pytest.approx(case.loss, rel=RTOL_LBFGS)
    assert res.loss >= case.loss * (1 - 1e-13)  # the closed form is the minimum, not just a critical value


@pytest.mark.parametrize("case", FLOW_CASES)
def test_gradient_flow_reaches_typed_loss(case):
    """The long-time limit of gradient flow from a random start is the typed minimal loss."""
    problem = case.problem()
    start = UFMParams.random(problem, case.p, rng=5)
    res = gradient_flow(problem, start, metrics=False, n_records=4)
    assert res.success, res.message
    assert res.loss[-1] == pytest.approx(case.loss, rel=RTOL_FLOW)


# ---------------------------------------------------------------- NC metrics of the minimizer
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", COLLAPSED, ids=str)
def test_nc_metrics_of_built_minimizer(case, dtype):
    """Features of the exact minimizer (H^T, (n, p) rows) cast to dtype: NC1 = 0, equinorm and
    equiangular centred means (NC2), the typed NC3 and eps, and W's typed cosines."""
    tol = TOLERANCES[dtype]
    problem = case.problem()
    params = problem.loss.closed_form(problem).build(case.p, rng=1)
    b = None if params.b is None else params.b.astype(dtype)
    m = nc_metrics(params.H.T.astype(dtype), problem.labels, params.W.astype(dtype), b)
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle", "nc2_equinorm_w", "nc2_equiangle_w"):
        assert abs(getattr(m, name)) < tol["nc_atol"], (name, getattr(m, name))
    assert m.nc3 == pytest.approx(case.nc3, abs=tol["nc_atol"] if case.nc3 == 0 else 2 * tol["cos_atol"])
    # nc2_maxangle_w is the mean of |cos_w + 1/(C-1)| over pairs of rows.
    assert m.nc2_maxangle_w == pytest.approx(abs(case.cos_w + 1 / (case.C - 1)), abs=tol["cos_atol"])
    assert m.eps == pytest.approx(case.eps, rel=tol["metric_rtol"])
    assert m.nc4 == 0
    assert m.rank_means == case.C - 1


@pytest.mark.parametrize("case", [BY_NAME["rank_one_C3"], BY_NAME["rank_one_C4"]], ids=str)
def test_rank_one_minimizer_puts_every_class_at_one_point(case):
    """Rank one (no bias, 1 - a <= delta < 1): W and the class means have rank one and the centred
    means vanish, so there is no class geometry (cos_h and nc3 are None in the catalogue)."""
    problem = case.problem()
    params = problem.loss.closed_form(problem).build(case.p, rng=2)
    y = problem.labels
    means = np.stack([params.H[:, y == c].mean(axis=1) for c in range(case.C)])  # (C, p)
    scale = np.sqrt(case.h_norm_sq)
    np.testing.assert_allclose(means - means.mean(axis=0), 0.0, atol=1e-14 * scale)
    s_w = np.linalg.svd(params.W, compute_uv=False)
    assert s_w[0] == pytest.approx(np.sqrt(case.C * case.w_row_norm_sq), rel=1e-12)
    assert np.all(s_w[1:] < 1e-14 * s_w[0])
