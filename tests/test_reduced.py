"""Reduced flow on the collapsed manifold (ufm.reduced) against the full flow and the closed form."""

from __future__ import annotations

import numpy as np
import pytest

from ufm.closed_form import ufm_optimum
from ufm.dynamics import gradient_flow
from ufm.dynamics.reduced import manifold_frame, manifold_params, reduced_field, reduced_flow, reduced_loss
from ufm.model import UFMProblem, loss


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("lam_w", "lam_h"), [(0.02, 0.02), (0.05, 0.01)])
def test_fixed_point_is_closed_form(bias, lam_w, lam_h):
    """The reduced flow's limit is the closed-form minimizer (module docstring of ufm.reduced)."""
    C, N = 4, 3
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias)
    opt = ufm_optimum(C, N, lam_w, lam_h, bias=bias)
    r = reduced_flow(problem, 0.3, 0.2, 0.0)
    assert r.status == 1, r.message
    assert r.a[-1] ** 2 == pytest.approx(opt.w_row_norm_sq, rel=1e-8)
    assert r.m[-1] ** 2 == pytest.approx(opt.h_norm_sq, rel=1e-8)
    assert r.loss[-1] == pytest.approx(opt.loss, rel=1e-10)
    assert r.eps[-1] == pytest.approx(opt.eps, abs=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_reduced_loss_equals_full_loss(bias):
    problem = UFMProblem(3, 2, 0.03, 0.07, lam_b=0.1 if bias else 0.0, bias=bias)
    F = manifold_frame(problem, 5, rng=0)
    assert reduced_loss(problem, 0.7, -0.4, 0.2 if bias else 0.0) == pytest.approx(
        loss(problem, manifold_params(problem, F, 0.7, -0.4, 0.2 if bias else 0.0)), rel=1e-13
    )


@pytest.mark.parametrize("bias", [True, False])
def test_full_flow_started_on_manifold_follows_reduced(bias):
    """The full gradient flow from a manifold point stays on it and matches (a, m, beta)(t); a
    regularized bias (lam_b = 0.1) exercises beta's decay term."""
    problem = UFMProblem(3, 2, 0.03, 0.05, lam_b=0.1, bias=bias)
    F = manifold_frame(problem, 4, rng=1)
    a0, m0, b0 = 0.2, 0.5, (0.1 if bias else 0.0)
    times = np.array([0.0, 0.5, 3.0, 10.0, 40.0])
    red = reduced_flow(problem, a0, m0, b0, t_max=40.0, t_eval=times, tol=0.0)
    full = gradient_flow(problem, manifold_params(problem, F, a0, m0, b0), t_max=40.0, t_eval=times, tol=0.0,
                         rtol=1e-11, atol=1e-13, dense_output=True, metrics=False)  # fmt: skip
    for i, t in enumerate(times):
        P = type(full.params).unravel(full.params, full.sol(t))
        expect = manifold_params(problem, F, red.a[i], red.m[i], red.beta[i])
        np.testing.assert_allclose(P.ravel(), expect.ravel(), atol=1e-8)


def test_field_vanishes_at_closed_form():
    problem = UFMProblem(5, 4, 0.01, 0.02)
    opt = ufm_optimum(5, 4, 0.01, 0.02)
    state = np.array([np.sqrt(opt.w_row_norm_sq), np.sqrt(opt.h_norm_sq), 1 / 5])
    assert np.abs(reduced_field(problem, state)).max() < 1e-14


def test_refuses_deep_or_ce():
    with pytest.raises(ValueError, match="depth 1"):
        reduced_flow(UFMProblem(3, 2, 0.1, 0.1, loss="ce"), 0.1, 0.1)
