"""GD, SGD and the normalized flow (ufm.dynamics.discrete) against the flow, GD itself and the closed form."""

from __future__ import annotations

import numpy as np
import pytest

from ufm.closed_form import ufm_optimum
from ufm.dynamics import gradient_flow
from ufm.dynamics.discrete import gradient_descent, normalized_flow, sgd
from ufm.model import UFMParams, UFMProblem, loss_and_grad


def test_gd_tracks_flow_first_order():
    """GD is the Euler method of the flow: the error at fixed T halves with the step (order ~1)."""
    problem = UFMProblem(3, 2, 0.05, 0.05)
    x0 = UFMParams.random(problem, 4, rng=0)
    T = 4.0
    ref = gradient_flow(problem, x0, t_max=T, tol=0.0, rtol=1e-12, atol=1e-14, metrics=False).params.ravel()
    errs = []
    for k in (40, 80, 160):
        r = gradient_descent(problem, x0, lr=T / k, n_steps=k, metrics=False, record_every=k)
        errs.append(np.linalg.norm(r.params.ravel() - ref))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert orders == pytest.approx([1.0, 1.0], abs=0.1)


def test_full_batch_sgd_is_gd():
    """SGD's gradient estimate is unbiased with the exact decay, so B = n gives GD (module docstring)."""
    problem = UFMProblem(3, 4, 0.05, 0.02)
    x0 = UFMParams.random(problem, 4, rng=1)
    a = gradient_descent(problem, x0, lr=0.3, n_steps=50, momentum=0.5, metrics=False)
    b = sgd(problem, x0, lr=0.3, n_steps=50, batch_size=problem.n, momentum=0.5, metrics=False)
    np.testing.assert_allclose(b.params.ravel(), a.params.ravel(), rtol=1e-12, atol=1e-14)
    # Heavy ball written out by hand: v <- mu v + grad L(theta), theta <- theta - lr v.
    theta, v = x0.ravel(), np.zeros(x0.ravel().size)
    for _ in range(50):
        v = 0.5 * v + loss_and_grad(problem, UFMParams.unravel(x0, theta))[1].ravel()
        theta = theta - 0.3 * v
    np.testing.assert_allclose(a.params.ravel(), theta, rtol=1e-12, atol=1e-14)


def test_sgd_minibatch_is_unbiased():
    """The mean of the mini-batch gradients over one epoch equals the full gradient (each example once)."""
    from ufm.dynamics.discrete import _batch_gradient

    problem = UFMProblem(3, 4, 0.05, 0.02)
    x = UFMParams.random(problem, 4, rng=2)
    full = loss_and_grad(problem, x)[1].ravel()
    per = 2
    order = np.arange(4).reshape(2, per)
    gs = [
        _batch_gradient(problem, x, (np.arange(3)[:, None] * 4 + order[j]).ravel(), per).ravel()
        for j in range(2)
    ]
    # H columns: each appears in exactly one batch with weight 1/B; mean over epochs scales by B/n.
    H_size = x.H.size
    mean = np.mean(gs, axis=0)
    np.testing.assert_allclose(mean[H_size:], full[H_size:], rtol=1e-12)
    Hpart = sum(g[:H_size] - problem.lam_h * x.H.ravel() for g in gs) * (6 / 12) + problem.lam_h * x.H.ravel()
    np.testing.assert_allclose(Hpart, full[:H_size], rtol=1e-12, atol=1e-15)


def test_sgd_evaluates_the_full_gradient_once_an_epoch(monkeypatch):
    """SGD's stopping rules look at the full gradient only at check steps (default: each epoch), so a
    step costs one mini-batch gradient; a target loss stops it at such a step."""
    import ufm.dynamics.discrete as discrete

    problem = UFMProblem(3, 8, 0.05, 0.02)
    x0 = UFMParams.random(problem, 4, rng=8)
    full_calls = []
    counted = discrete.loss_and_grad

    def counting(prob, params, **buffers):
        full_calls.append(prob is problem)
        return counted(prob, params, **buffers)

    monkeypatch.setattr(discrete, "loss_and_grad", counting)
    r = sgd(
        problem, x0, lr=0.1, n_steps=40, batch_size=6, record_every=1000, metrics=False
    )  # 4 steps an epoch
    assert r.status == 0 and r.nfev == 40
    assert sum(full_calls) == 11  # steps 0, 4, ..., 40
    target = 0.5 * (r.loss[0] + r.loss[-1])
    full_calls.clear()
    s = sgd(
        problem, x0, lr=0.1, n_steps=40, batch_size=6, record_every=1000, metrics=False, target_loss=target
    )
    assert s.status == 2 and s.steps[-1] % 4 == 0 and s.loss[-1] <= target
    assert sum(full_calls) == s.steps[-1] // 4 + 1


def test_gd_reaches_closed_form():
    problem = UFMProblem(3, 3, 0.05, 0.05)
    opt = ufm_optimum(3, 3, 0.05, 0.05)
    r = gradient_descent(problem, UFMParams.random(problem, 4, rng=3), lr=1.0, n_steps=20000, tol=1e-10,
                         metrics=False)  # fmt: skip
    assert r.status == 1 and r.loss[-1] == pytest.approx(opt.loss, rel=1e-8)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_huge_step_diverges_with_message(batch_size):
    """GD, and SGD between its full-gradient checks, stop at the first non-finite gradient."""
    problem = UFMProblem(3, 3, 0.05, 0.05)
    x0 = UFMParams.random(problem, 4, rng=4)
    if batch_size is None:
        r = gradient_descent(problem, x0, lr=1e3, n_steps=1000, metrics=False)
    else:
        r = sgd(problem, x0, lr=1e3, n_steps=1000, batch_size=batch_size, check_every=1000, metrics=False)
    assert not r.success and r.status == -1
    assert (
        "diverged" in r.message
        and "last good step" in r.message
        and ("overflow" in r.message.lower() or "non-finite" in r.message)
    )
    assert np.all(np.isfinite(r.params.ravel()))


def test_normalized_flow_reaches_closed_form_on_sphere():
    """Journal paper's normalized dynamics: ||V|| = 1 kept, loss decreasing, same limit as the flow."""
    problem = UFMProblem(3, 3, 0.05, 0.05)
    opt = ufm_optimum(3, 3, 0.05, 0.05)
    r = normalized_flow(
        problem, UFMParams.random(problem, 4, rng=5), tol=1e-9, rtol=1e-12, atol=1e-14, n_records=20
    )
    assert r.status == 1, r.message
    assert r.loss[-1] == pytest.approx(opt.loss, rel=1e-8)
    assert np.all(np.diff(r.loss) <= 1e-12)
    assert r.metrics["v_norm_err"].max() < 1e-8
    assert r.metrics["rho_1"][-1] ** 2 == pytest.approx(3 * opt.w_row_norm_sq, rel=1e-7)
