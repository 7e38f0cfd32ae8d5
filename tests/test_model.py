"""The UFM losses and their analytic gradients (float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ufm.model import (
    UFMParams,
    UFMProblem,
    check_params,
    loss,
    loss_and_grad,
    loss_and_grad_norm,
    outputs,
    torch_loss,
)

VARIANTS = [
    dict(loss="mse", depth=1),
    dict(loss="mse", depth=1, bias=False),
    dict(loss="ce", depth=1),
    dict(loss="mse", depth=3, activation="relu"),
    dict(loss="ce", depth=2, activation="linear"),
    dict(loss="mse", depth=2, activation="relu", bias=False),
]


def _problem(**kw):
    depth = kw.get("depth", 1)
    lam_w = tuple(0.01 * (k + 1) for k in range(depth))
    return UFMProblem(4, 3, lam_w, 0.03, lam_b=0.05, **kw)


@pytest.mark.parametrize("kw", VARIANTS)
def test_gradient_matches_finite_differences(kw):
    """Central differences with step 1e-6 agree with backprop to 1e-8 (their truncation error ~ h^2)."""
    problem = _problem(**kw)
    params = UFMParams.random(problem, 5, rng=1)
    _, grad = loss_and_grad(problem, params)
    theta, g = params.ravel(), grad.ravel()
    h = 1e-6
    for i in np.random.default_rng(0).choice(theta.size, 40, replace=False):
        e = np.zeros_like(theta)
        e[i] = h
        fd = (
            loss(problem, UFMParams.unravel(params, theta + e))
            - loss(problem, UFMParams.unravel(params, theta - e))
        ) / (2 * h)
        assert fd == pytest.approx(g[i], abs=1e-8)


@pytest.mark.parametrize("kw", VARIANTS)
def test_gradient_matches_torch_autograd(kw):
    problem = _problem(**kw)
    params = UFMParams.random(problem, 5, rng=2)
    value, grad = loss_and_grad(problem, params)
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in params.arrays()]
    n_w = problem.depth
    b = tensors[1 + n_w] if problem.bias else None
    t_loss = torch_loss(problem, tensors[0], tensors[1 : 1 + n_w], b)
    t_loss.backward()
    assert t_loss.item() == pytest.approx(value, rel=1e-13)
    for a, t in zip(grad.arrays(), tensors):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-11, atol=1e-14)


def test_mse_matches_poster_formula():
    """L = 1/(2NC) sum_{n,c,i} (y - f)^2 + lam/2 (||W||^2 + ||H||^2), written out term by term."""
    problem = UFMProblem(3, 2, 0.1, 0.2, bias=False)
    params = UFMParams.random(problem, 4, rng=3)
    f = outputs(problem, params)
    direct = sum(
        (float(problem.labels[j] == i) - f[i, j]) ** 2 for i in range(problem.C) for j in range(problem.n)
    ) / (2 * problem.N * problem.C)
    direct += 0.05 * np.sum(params.W**2) + 0.1 * np.sum(params.H**2)
    assert loss(problem, params) == pytest.approx(direct, rel=1e-14)


@given(lam=st.floats(1e-4, 1.0), seed=st.integers(0, 2**31), bias=st.booleans(), C=st.integers(2, 6))
def test_balancedness_identity(lam, seed, bias, C):
    """With lam_w = lam_h = lam, along gradient flow d/dt (W^T W - H H^T) = -2 lam (W^T W - H H^T).

    The left side is -(W^T gW + gW^T W) + (gH H^T + H gH^T) from the analytic gradient; the identity
    holds at every point, with or without a bias (the data terms W^T R H^T / n cancel)."""
    problem = UFMProblem(C, 3, lam, lam, bias=bias)
    params = UFMParams.random(problem, C + 1, rng=seed)
    if bias:
        params = UFMParams(params.H, params.Ws, np.random.default_rng(seed).standard_normal(C))
    _, g = loss_and_grad(problem, params)
    W, H = params.W, params.H
    lhs = -(W.T @ g.W + g.W.T @ W) + (g.H @ H.T + H @ g.H.T)
    rhs = -2 * lam * (W.T @ W - H @ H.T)
    np.testing.assert_allclose(lhs, rhs, atol=1e-12 * (1 + np.abs(rhs).max()))


def test_ravel_roundtrip(rng):
    problem = UFMProblem(3, 2, (0.1, 0.2), 0.1, depth=2)
    params = UFMParams.random(problem, 4, rng=rng)
    back = UFMParams.unravel(params, params.ravel())
    for a, b in zip(params.arrays(), back.arrays()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: UFMProblem(1, 3, 0.1, 0.1), "C must be an integer >= 2"),
        (lambda: UFMProblem(3, 0, 0.1, 0.1), "N"),
        (lambda: UFMProblem(3, 2, -0.1, 0.1), "lam_w"),
        (lambda: UFMProblem(3, 2, 0.1, float("nan")), "lam_h"),
        (lambda: UFMProblem(3, 2, (0.1, 0.2), 0.1), "depth"),
        (lambda: UFMProblem(3, 2, 0.1, 0.1, loss="hinge"), "unknown loss"),
        (lambda: UFMProblem(3, 2, 0.1, 0.1, depth=2, activation="tanh"), "unknown activation"),
    ],
)
def test_bad_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_params():
    problem = UFMProblem(3, 2, 0.1, 0.1)
    good = UFMParams.random(problem, 4, rng=0)
    with pytest.raises(ValueError, match="H must have shape"):
        check_params(problem, UFMParams(good.H[:, :-1], good.Ws, good.b))
    with pytest.raises(ValueError, match="classifier"):
        check_params(problem, UFMParams(good.H, (good.W[:, :-1],), good.b))
    with pytest.raises(ValueError, match="non-finite"):
        check_params(problem, UFMParams(np.full_like(good.H, np.inf), good.Ws, good.b))
    with pytest.raises(ValueError, match="bias"):
        check_params(problem, UFMParams(good.H, good.Ws, None))


@pytest.mark.parametrize(
    "kw", VARIANTS + [dict(loss="ce", label_smoothing=0.2), dict(loss="mse", counts=(3, 1, 2, 6))]
)
def test_gradient_over_column_blocks_into_a_buffer_matches_autograd(kw, monkeypatch):
    """loss_and_grad over several column blocks (the last one partial), written into a reused buffer
    with reused scratch, and with ``negate``, equals torch autograd: the blocks' sums of dW and db and
    the loss averaged over all n examples are those of the whole batch (docs/theory.md §13.3)."""
    import ufm.model as model

    kw = dict(kw)
    counts = kw.pop("counts", 3)
    depth = kw.get("depth", 1)
    rows = 4 + (depth * 5 if depth > 1 else 0)  # C + L p scratch rows a column
    monkeypatch.setattr(model, "SCRATCH_MIN", 5 * rows)  # blocks of 5, 5 and 2 of the n = 12 columns
    monkeypatch.setattr(model, "SCRATCH_SHARE", 0.0)
    problem = UFMProblem(4, counts, tuple(0.01 * (k + 1) for k in range(depth)), 0.03, lam_b=0.05, **kw)
    params = UFMParams.random(problem, 5, rng=3)
    work = model.GradientWork(problem, params)
    assert [c.stop - c.start for c in work.blocks] == [5, 5, 2]
    out = np.empty(params.ravel().size)
    loss_and_grad(problem, UFMParams.random(problem, 5, rng=4), out=out, work=work)  # stale scratch
    value, grad = loss_and_grad(problem, params, out=out, work=work)
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in params.arrays()]
    b = tensors[1 + depth] if problem.bias else None
    t_loss = torch_loss(problem, tensors[0], tensors[1 : 1 + depth], b)
    t_loss.backward()
    assert t_loss.item() == pytest.approx(value, rel=1e-13)
    reference = np.concatenate([t.grad.numpy().ravel() for t in tensors])
    assert np.shares_memory(grad.H, out)
    np.testing.assert_allclose(out, reference, rtol=1e-11, atol=1e-14)
    loss_and_grad(problem, params, out=out, work=work, negate=True)
    np.testing.assert_allclose(out, -reference, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize(
    "kw", VARIANTS + [dict(loss="ce", label_smoothing=0.2), dict(loss="mse", counts=(3, 1, 2, 6))]
)
def test_gradient_norm_over_column_blocks_matches_autograd(kw, monkeypatch):
    """loss_and_grad_norm, which forms dL/dH one block of columns at a time in scratch (blocks of 5,
    5 and 2 of the n = 12 columns, the scratch stale from another point), gives the loss and the norm
    of torch autograd's whole gradient, to 1e-13 and 1e-12 relative."""
    import ufm.model as model

    kw = dict(kw)
    counts = kw.pop("counts", 3)
    depth = kw.get("depth", 1)
    rows = 4 + (depth * 5 if depth > 1 else 0) + 2 * 5  # C + L p + the two feature blocks
    monkeypatch.setattr(model, "SCRATCH_MIN", 5 * rows)
    monkeypatch.setattr(model, "SCRATCH_SHARE", 0.0)
    problem = UFMProblem(4, counts, tuple(0.01 * (k + 1) for k in range(depth)), 0.03, lam_b=0.05, **kw)
    params = UFMParams.random(problem, 5, rng=5)
    work = model.GradientWork(problem, params, feature_blocks=True)
    assert [c.stop - c.start for c in work.blocks] == [5, 5, 2]
    loss_and_grad_norm(problem, UFMParams.random(problem, 5, rng=6), work=work)
    value, norm = loss_and_grad_norm(problem, params, work=work)
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in params.arrays()]
    b = tensors[1 + depth] if problem.bias else None
    t_loss = torch_loss(problem, tensors[0], tensors[1 : 1 + depth], b)
    t_loss.backward()
    reference = np.sqrt(sum(float((t.grad**2).sum()) for t in tensors))
    assert value == pytest.approx(t_loss.item(), rel=1e-13)
    assert norm == pytest.approx(reference, rel=1e-12)
    with pytest.raises(ValueError, match="feature_blocks=True"):
        loss_and_grad_norm(problem, params, work=model.GradientWork(problem, params))
