"""End points classified (docs/theory.md §13.7): geometry, Hessian by Lanczos, minimum or saddle.

References independent of ``ufm.critical``: central differences of the NumPy gradient of
``ufm.model`` (torch is not involved there), dense Hessians assembled from them and diagonalized by
``numpy.linalg.eigvalsh``, and critical points whose Hessians or losses are typed out by hand.
"""

import numpy as np
import pytest
from problems import helmert_etf

from ufm.critical import (
    HESSIAN_RTOL,
    classify_point,
    hessian_operator,
    point_geometry,
)
from ufm.dynamics import gradient_descent, gradient_flow
from ufm.dynamics.reduced import manifold_frame, manifold_params, reduced_flow
from ufm.model import UFMParams, UFMProblem, loss_and_grad
from ufm.optimize import minimize_loss

VARIANTS = [
    dict(loss="mse", depth=1, lam_b=0.5),
    dict(loss="mse", depth=1, bias=False),
    dict(loss="ce", depth=1),
    dict(loss="mse", depth=3, activation="linear"),
    dict(loss="ce", depth=2, activation="relu", bias=False),
]


def _problem(**kw):
    depth = kw.get("depth", 1)
    lam_w = tuple(0.01 * (k + 1) for k in range(depth))  # distinct per-layer decays, W_1 first
    return UFMProblem(4, 3, lam_w, 0.03, **kw)


def _fd_grad_diff(problem, params, v, h):
    """(grad L(theta + h v) - grad L(theta - h v)) / (2h) from the NumPy gradient."""
    theta = params.ravel()
    g = [loss_and_grad(problem, UFMParams.unravel(params, theta + s * h * v))[1].ravel() for s in (1, -1)]
    return (g[0] - g[1]) / (2 * h)


def _dense_hessian(problem, params, h=1e-5):
    """Hessian by central differences of the NumPy gradient, one column per parameter, symmetrized.
    Error: truncation h^2 |d^4 L| / 6 plus rounding eps |grad L| / h, both ~1e-10 here."""
    n = params.ravel().size
    H = np.column_stack([_fd_grad_diff(problem, params, e, h) for e in np.eye(n)])
    return (H + H.T) / 2


@pytest.mark.parametrize("kw", VARIANTS)
def test_hessian_vector_products_match_finite_differences_of_the_gradient(kw):
    """Torch double backward against central differences of the analytic NumPy gradient: the
    difference is the FD error, O(h^2) ~ 1e-10 at h = 1e-5 relative to ||H v||."""
    problem = _problem(**kw)
    params = UFMParams.random(problem, 5, rng=1)
    if params.b is not None:
        params = UFMParams(params.H, params.Ws, np.random.default_rng(2).standard_normal(problem.C))
    hvp = hessian_operator(problem, params)
    for seed in range(3):
        v = np.random.default_rng(seed).standard_normal(params.ravel().size)
        exact, fd = hvp(v), _fd_grad_diff(problem, params, v, 1e-5)
        assert np.linalg.norm(exact - fd) <= 1e-7 * np.linalg.norm(fd)


@pytest.mark.parametrize("method", ["lanczos", "dense"])
@pytest.mark.parametrize("kw", VARIANTS[:4])
def test_hessian_extremes_match_a_dense_fd_hessian(kw, method, monkeypatch):
    """lambda_min and max |lambda| by eigsh (Lanczos) and from the Hessian formed by products
    (dense, at most HESSIAN_DENSE_MAX parameters) against eigvalsh of the dense FD Hessian of the
    NumPy gradient, at a random (non-stationary) point and at an L-BFGS end point."""
    monkeypatch.setattr("ufm.critical.HESSIAN_DENSE_MAX", 0 if method == "lanczos" else 10**9)
    problem = _problem(**kw)
    start = UFMParams.random(problem, 4, rng=3)
    for params in (start, minimize_loss(problem, 4, n_starts=1, start=start, classify=False).params):
        cp = classify_point(problem, params)
        eig = np.linalg.eigvalsh(_dense_hessian(problem, params))
        assert cp.hessian_min_eig == pytest.approx(eig[0], abs=1e-7)
        assert cp.hessian_max_abs_eig == pytest.approx(np.abs(eig).max(), rel=1e-7)
        assert (cp.hvp_count == params.ravel().size) == (method == "dense")


def test_zero_is_a_saddle_with_the_typed_hessian():
    """Depth 1, no bias, equal decays lam, at (W, H) = 0: x^T Hess x = lam ||x||^2 - (2/n) <Y, W H>, so
    the extreme eigenvalues are lam -+ s_max(Y)/n = lam -+ 1/(C sqrt(N)) (typed out here). With
    delta = C sqrt(N) lam < 1 the zero point is a strict saddle."""
    C, N, lam, p = 3, 4, 0.05, 3
    problem = UFMProblem(C, N, lam, lam, bias=False)
    zero = UFMParams(np.zeros((p, C * N)), (np.zeros((C, p)),), None)
    cp = classify_point(problem, zero)
    assert (cp.geometry, cp.rank, cp.critical_point) == ("zero", 0, "saddle")
    assert cp.grad_norm == 0.0
    assert cp.hessian_min_eig == pytest.approx(lam - 1 / (C * np.sqrt(N)), rel=1e-9)
    assert cp.hessian_max_abs_eig == pytest.approx(lam + 1 / (C * np.sqrt(N)), rel=1e-9)


@pytest.mark.parametrize(("bias", "geometry"), [(True, "simplex_etf"), (False, "orthogonal_frame")])
def test_global_minimizer_is_a_minimum_with_flat_rotations(bias, geometry):
    """The built closed-form minimizer: stationary, lambda_min ~ 0 (the rotations W Q^T, Q H are flat),
    labelled a minimum with the closed form's geometry."""
    problem = UFMProblem(4, 3, 0.02, 0.03, bias=bias)
    params = problem.loss.closed_form(problem).build(5, rng=0)
    cp = classify_point(problem, params)
    assert (cp.geometry, cp.critical_point) == (geometry, "minimum")
    assert cp.rank == (3 if bias else 4)
    assert abs(cp.hessian_min_eig) <= HESSIAN_RTOL * cp.hessian_max_abs_eig
    eig = np.linalg.eigvalsh(_dense_hessian(problem, params))
    assert eig[0] == pytest.approx(cp.hessian_min_eig, abs=1e-7)
    # so(5) acts on R^p: at least the rotations fixing the span of the minimizer are flat directions.
    assert (np.abs(eig) < 1e-7).sum() >= 3


def test_geometry_of_typed_frames():
    """ETF (Helmert rows, rotated and scaled), orthogonal frame, a square in a plane (rank 2, C = 4),
    and the zero point, with H the classifier rows repeated (so the class means are the rows)."""
    C, N, p = 4, 2, 6
    problem = UFMProblem(C, N, 0.1, 0.1, bias=False)
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((p, p)))[0]
    square = np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    frames = {
        "simplex_etf": 3.0 * np.hstack([helmert_etf(C), np.zeros((C, p - C + 1))]) @ Q,
        "orthogonal_frame": 0.5 * np.eye(C, p) @ Q,
        "other": 2.0 * np.hstack([square, np.zeros((C, p - 2))]) @ Q,
    }
    for name, W in frames.items():
        params = UFMParams(W[problem.labels].T, (W,), None)
        geometry, rank, etf, orth = point_geometry(problem, params)
        assert geometry == name
        assert rank == {"simplex_etf": 3, "orthogonal_frame": 4, "other": 2}[name]
    zero = UFMParams(np.zeros((p, C * N)), (frames["other"],), None)  # W != 0, features 0: outputs 0
    assert point_geometry(problem, zero)[:2] == ("zero", 0)


def test_random_point_is_not_stationary_and_the_hessian_can_be_skipped():
    problem = UFMProblem(3, 2, 0.1, 0.1)
    params = UFMParams.random(problem, 3, rng=0)
    assert classify_point(problem, params).critical_point == "not_stationary"
    cp = classify_point(problem, params, hessian=False)
    assert cp.hessian_min_eig is None and cp.hvp_count == 0 and "skipped" in cp.note
    built = problem.loss.closed_form(problem).build(3)
    skipped = classify_point(problem, built, hessian=False)
    assert skipped.critical_point == "stationary" and skipped.geometry == "simplex_etf"


# Issue 14, case (a): C = 4, N = 5, lam = 0.02, lam_b = 1. delta = C sqrt(N) lam, and (docs/theory.md §6)
# the ETF point with b = 1/(C(1 + lam_b)) costs (C-1)(delta - delta^2/2)/C + lam_b/(2C(1 + lam_b)),
# while the minimizer (the bias saturates, lam_b (1 - delta) > delta) costs
# delta - delta^2/2 - delta^2/(2 C lam_b) with rank C: both typed out here.
C_A, N_A, LAM_A, LAM_B_A = 4, 5, 0.02, 1.0
DELTA_A = C_A * np.sqrt(N_A) * LAM_A
ETF_LOSS_A = (C_A - 1) * (DELTA_A - DELTA_A**2 / 2) / C_A + LAM_B_A / (2 * C_A * (1 + LAM_B_A))
MIN_LOSS_A = DELTA_A - DELTA_A**2 / 2 - DELTA_A**2 / (2 * C_A * LAM_B_A)


def _reduced_end_point(p):
    problem = UFMProblem(C_A, N_A, LAM_A, LAM_A, lam_b=LAM_B_A)
    r = reduced_flow(problem, 1.0, 1.0, 0.0)
    assert r.beta[-1] == pytest.approx(1 / (C_A * (1 + LAM_B_A)), rel=1e-9)
    return problem, manifold_params(problem, manifold_frame(problem, p), r.a[-1], r.m[-1], r.beta[-1])


def test_regularized_bias_etf_point_is_a_saddle_and_lbfgs_reaches_the_minimum():
    problem, etf = _reduced_end_point(4)
    cp = classify_point(problem, etf)
    assert cp.loss == pytest.approx(ETF_LOSS_A, rel=1e-12)  # 0.18466
    assert (cp.geometry, cp.critical_point) == ("simplex_etf", "saddle")
    dense_min = np.linalg.eigvalsh(_dense_hessian(problem, etf))[0]
    assert dense_min < -1e-2 and cp.hessian_min_eig == pytest.approx(dense_min, abs=1e-7)  # -0.0359
    theta = etf.ravel() + 1e-3 * np.random.default_rng(0).standard_normal(etf.ravel().size)
    res = minimize_loss(problem, 4, n_starts=1, start=UFMParams.unravel(etf, theta))
    assert res.loss == pytest.approx(MIN_LOSS_A, rel=1e-10)  # 0.15889
    assert (res.critical.critical_point, res.critical.geometry, res.critical.rank) == ("minimum", "other", 4)


def test_regularized_bias_etf_point_is_a_minimum_where_rank_c_does_not_fit():
    """In p = C-1 the rank-C minimizer has no room: the same ETF point is then a minimum."""
    problem, etf = _reduced_end_point(3)
    cp = classify_point(problem, etf)
    assert (cp.geometry, cp.critical_point) == ("simplex_etf", "minimum")
    assert np.linalg.eigvalsh(_dense_hessian(problem, etf))[0] > -1e-8


@pytest.mark.parametrize("lam", [0.085, 0.09])
def test_deep_linear_starts_report_their_spread_and_label_each_end(lam):
    """Issue 14, case (b): depth 2, C = 3, N = 4, no bias, p = 4. The zero solution (loss 1/2, typed)
    is a strict minimum whose Hessian is lam I exactly (the data term is trilinear, so its second
    derivatives vanish at 0); other starts stop at nonzero local minima of higher loss."""
    problem = UFMProblem(3, 4, lam, lam, depth=2, bias=False)
    res = minimize_loss(problem, 4, n_starts=6, seed=0)
    assert res.loss == pytest.approx(0.5, abs=1e-12) and res.critical.geometry == "zero"
    assert res.critical.hessian_min_eig == pytest.approx(lam, rel=1e-6)  # the end is 1e-9 from 0
    assert res.loss_worst > res.loss + 1e-3 and res.n_distinct >= 2
    assert res.spread() == {"best": res.loss, "worst": res.loss_worst, "n_distinct": res.n_distinct}
    assert len(res.ends) == 6
    for end, value in zip(res.ends, res.losses):
        assert end.loss == pytest.approx(value, rel=1e-12)
        assert end.critical_point == "minimum"
        assert (end.geometry == "zero") == (value < 0.5 + 1e-9)
        assert end.geometry in ("zero", "other") and (end.geometry == "zero" or end.rank in (1, 2))


@pytest.mark.parametrize(("seed", "geometry", "rank"), [(0, "simplex_etf", 3), (1, "other", 2)])
def test_deep_cross_entropy_rank_two_end_points_are_not_called_an_etf(seed, geometry, rank):
    """Issue 14, case (c): cross-entropy, depth 3, (C, N, p) = (4, 5, 6), lam = 1e-2. Seed 1 ends at
    a rank-2 point whose classifier rows form a square (pairwise cosines 0, 0, -1 per row; typed
    here, nc2_equiangle = std = sqrt(2)/3 = 0.471), and it is labelled "other" with rank 2."""
    problem = UFMProblem(4, 5, 1e-2, 1e-2, loss="ce", depth=3)
    flow = gradient_flow(problem, UFMParams.random(problem, 6, rng=seed), metrics=False)
    cp = flow.critical
    assert flow.status == 1
    assert (cp.geometry, cp.rank, cp.critical_point) == (geometry, rank, "minimum")
    W = flow.params.W
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = (U @ U.T)[~np.eye(4, dtype=bool)]
    if geometry == "other":
        np.testing.assert_allclose(np.sort(cos), [-1] * 4 + [0] * 8, atol=1e-5)
        assert cos.std() == pytest.approx(np.sqrt(2) / 3, abs=1e-5)
    else:
        np.testing.assert_allclose(cos, -1 / 3, atol=1e-5)


def test_descent_result_classifies_its_end_and_classify_false_skips_it():
    problem = UFMProblem(3, 2, 0.05, 0.05)
    start = UFMParams.random(problem, 3, rng=0)
    gd = gradient_descent(problem, start, lr=0.5, n_steps=20, record_every=10)
    assert gd.critical is not None and gd.critical.critical_point == "not_stationary"
    assert gd.critical.grad_norm == pytest.approx(gd.grad_norm, rel=1e-12)
    assert gradient_descent(problem, start, lr=0.5, n_steps=5, classify=False).critical is None
    assert gradient_flow(problem, start, t_max=1.0, classify=False).critical is None
