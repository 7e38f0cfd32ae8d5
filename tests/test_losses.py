"""Loss objects: values against typed-out formulas, gradients against finite differences and torch
autograd (float64), the bias curvature, label smoothing and per-class counts end to end."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from ufm.closed_form import ufm_optimum
from ufm.dynamics import gradient_flow, reduced_flow
from ufm.losses import LOSSES, CrossEntropy, Loss, NoClosedForm, SquareLoss, get_loss
from ufm.model import UFMParams, UFMProblem, loss, loss_and_grad, outputs, torch_loss

SMOOTHINGS = (0.0, 0.1, 0.4)


@pytest.mark.parametrize("a", SMOOTHINGS)
def test_square_loss_value_is_the_typed_formula(a):
    """1/(2n) sum_i sum_c (f_ci - t_ci)^2 with t = (1 - a) y + a/C, written out elementwise."""
    f = np.array([[0.9, 0.2, -0.1], [0.3, 0.5, 0.2]])  # (C, n) = (2, 3)
    labels = np.array([0, 1, 1])
    expected = 0.0
    for i, y in enumerate(labels):
        for c in range(2):
            t = (1 - a) * (c == y) + a / 2
            expected += (f[c, i] - t) ** 2
    expected /= 2 * 3
    sq = SquareLoss(a)
    assert sq.value(f, sq.targets(labels, 2)) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("a", SMOOTHINGS)
def test_cross_entropy_value_is_the_typed_formula(a):
    """1/n sum_i -sum_c t_ci log(e^{f_ci} / sum_c' e^{f_c'i}), and torch's label_smoothing agrees."""
    f = np.array([[2.0, -1.0], [0.5, 0.0], [-0.3, 1.5]])  # (C, n) = (3, 2)
    labels = np.array([0, 2])
    expected = 0.0
    for i, y in enumerate(labels):
        z = np.exp(f[:, i]).sum()
        for c in range(3):
            t = (1 - a) * (c == y) + a / 3
            expected -= t * np.log(np.exp(f[c, i]) / z)
    expected /= 2
    ce = CrossEntropy(a)
    assert ce.value(f, ce.targets(labels, 3)) == pytest.approx(expected, rel=1e-14)
    got = ce.torch_value(torch.tensor(f.T), torch.tensor(labels), 3)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def _problems():
    for name in LOSSES:
        for a in (0.0, 0.15):
            for counts in (3, (4, 2, 1)):
                yield UFMProblem(3, counts, 0.02, 0.03, lam_b=0.01, loss=name, label_smoothing=a)
    yield UFMProblem(3, (3, 1, 2), 0.02, 0.03, loss="ce", label_smoothing=0.2, depth=2, activation="relu")


@pytest.mark.parametrize("problem", list(_problems()), ids=lambda p: f"{p.loss.description}-{p.counts}")
def test_gradient_against_finite_differences_and_autograd(problem):
    """The analytic gradient of every loss, with smoothing and per-class counts: central differences
    (step 1e-6, error ~1e-9) and torch autograd in float64 (rounding only)."""
    params = UFMParams.random(problem, 4, rng=3)
    params = UFMParams(params.H, params.Ws, None if params.b is None else np.full(3, 0.1))
    _, grad = loss_and_grad(problem, params)
    theta, g = params.ravel(), grad.ravel()
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(theta.size)
        step = 1e-6
        fd = (loss(problem, UFMParams.unravel(params, theta + step * v))
              - loss(problem, UFMParams.unravel(params, theta - step * v))) / (2 * step)  # fmt: skip
        assert g @ v == pytest.approx(fd, rel=1e-6, abs=1e-9)
    tensors = [torch.tensor(a, requires_grad=True) for a in params.arrays()]
    n_w = len(params.Ws)
    value = torch_loss(
        problem, tensors[0], tensors[1 : 1 + n_w], tensors[1 + n_w] if params.b is not None else None
    )
    value.backward()
    auto = np.concatenate([t.grad.numpy().ravel() for t in tensors])
    np.testing.assert_allclose(g, auto, rtol=1e-10, atol=1e-13)
    assert float(value.detach()) == pytest.approx(loss(problem, params), rel=1e-13)


def test_bias_curvature_is_the_bias_hessian():
    """d^2 L_data / db^2 by second differences: exactly 1 * I for the square loss (any outputs, any
    smoothing); for cross-entropy it varies with the outputs, so its stated constant is 0."""
    C = 3
    labels = np.array([0, 1, 2, 2, 1])
    f0 = np.random.default_rng(1).standard_normal((C, labels.size))

    def hessian(loss_obj):
        T = loss_obj.targets(labels, C)
        h, H = 1e-4, np.zeros((C, C))
        for j in range(C):
            for k in range(C):
                ej, ek = np.eye(C)[j][:, None] * h, np.eye(C)[k][:, None] * h
                H[j, k] = (loss_obj.value(f0 + ej + ek, T) - loss_obj.value(f0 + ej - ek, T)
                           - loss_obj.value(f0 - ej + ek, T) + loss_obj.value(f0 - ej - ek, T)) / (4 * h * h)  # fmt: skip
        return H

    np.testing.assert_allclose(hessian(SquareLoss(0.2)), np.eye(C), atol=1e-7)  # 1/(2n) summed over n columns
    assert SquareLoss(0.2).bias_curvature == 1.0
    ce = hessian(CrossEntropy())
    assert np.abs(ce - np.diag(np.diag(ce))).max() > 1e-3  # not a multiple of I
    assert CrossEntropy().bias_curvature == 0.0


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="'mse'.*'ce'"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="contradicts"):
        get_loss(SquareLoss(0.1), 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        UFMProblem(3, 2, 0.1, 0.1, label_smoothing=1.0)
    assert UFMProblem(3, 2, 0.1, 0.1, loss=SquareLoss(0.3)).label_smoothing == 0.3


def test_counts_define_the_problem():
    """Per-class counts: labels class-major, n = sum, equal counts stored as one int, wrong lengths refused."""
    p = UFMProblem(3, (4, 2, 1), 0.1, 0.1)
    assert p.n == 7 and p.counts == (4, 2, 1) and not p.balanced
    np.testing.assert_array_equal(p.labels, [0, 0, 0, 0, 1, 1, 2])
    assert UFMProblem(3, (2, 2, 2), 0.1, 0.1) == UFMProblem(3, 2, 0.1, 0.1)
    with pytest.raises(ValueError, match="3 per-class counts but C = 4"):
        UFMProblem(4, (4, 2, 1), 0.1, 0.1)
    with pytest.raises(ValueError, match="examples of class 1"):
        UFMProblem(3, (4, 0, 1), 0.1, 0.1)
    ce = UFMProblem(3, (4, 2, 1), 0.1, 0.1, loss="ce")
    with pytest.raises(NoClosedForm, match="per-class counts"):
        ce.loss.closed_form(ce)
    deep_ce = UFMProblem(3, 2, 0.1, 0.1, loss="ce", depth=2)
    with pytest.raises(NoClosedForm, match="cross-entropy at depth 2"):
        deep_ce.loss.closed_form(deep_ce)


def test_imbalanced_flow_is_stationary_and_fits_the_majority_best():
    """Gradient flow with counts (8, 4, 2, 1): ends stationary, and the majority class gets the largest
    correct-class output (its residual weighs 8x the minority's in the loss)."""
    problem = UFMProblem(4, (8, 4, 2, 1), 0.01, 0.01)
    r = gradient_flow(problem, UFMParams.random(problem, 5, rng=0), metrics=False)
    assert r.status == 1
    f = outputs(problem, r.params)
    correct = [f[c, problem.labels == c].mean() for c in range(4)]
    assert correct == sorted(correct, reverse=True)


@pytest.mark.parametrize("bias", [True, False])
def test_label_smoothed_flow_reaches_the_closed_form(bias):
    """Flow and closed form agree under label smoothing (the closed form is typed out in
    tests/problems.py and proven in ufm.proofs.label_smoothing)."""
    problem = UFMProblem(4, 5, 0.02, 0.02, bias=bias, label_smoothing=0.1)
    r = gradient_flow(problem, UFMParams.random(problem, 6, rng=0))
    opt = ufm_optimum(4, 5, 0.02, 0.02, bias=bias, label_smoothing=0.1)
    assert r.loss[-1] == pytest.approx(opt.loss, rel=1e-9)
    assert r.metrics["eps"][-1] == pytest.approx(opt.eps, rel=1e-6)
    assert r.metrics["cos_w"][-1] == pytest.approx(opt.cos_w, abs=1e-6)


def test_reduced_flow_with_label_smoothing_follows_the_full_flow():
    """On the collapsed manifold with a bias, the scalar flow with margin 1 - a equals the full flow
    started on the manifold (the full flow is the independent reference)."""
    from ufm.dynamics.reduced import manifold_frame, manifold_params

    problem = UFMProblem(3, 2, 0.05, 0.05, label_smoothing=0.2)
    frame = manifold_frame(problem, 3)
    a0, m0, beta0 = 0.3, 0.2, 0.1
    ts = np.array([0.5, 3.0, 20.0])
    red = reduced_flow(problem, a0, m0, beta0, t_max=20.0, t_eval=ts, tol=0.0)
    full = gradient_flow(problem, manifold_params(problem, frame, a0, m0, beta0), method="DOP853",
                         t_max=20.0, tol=0.0, rtol=1e-11, atol=1e-13, t_eval=ts, metrics=False)  # fmt: skip
    np.testing.assert_allclose(red.loss, full.loss[:3], rtol=1e-8)


@dataclass(frozen=True)
class PseudoHuber(Loss):
    """A loss the library has never seen: 1/n sum_i sum_c (sqrt(1 + (f - t)^2) - 1)."""

    name: ClassVar[str] = "pseudo_huber"

    def value_and_grad(self, f, T):
        r = f - T
        root = np.sqrt(1 + r * r)
        return float(np.sum(root - 1)) / f.shape[1], r / root / f.shape[1]

    def torch_value(self, f, labels, C):
        r = f - self.torch_targets(labels, C, f.dtype)
        return (torch.sqrt(1 + r * r) - 1).sum(dim=1).mean()

    @property
    def bias_curvature(self) -> float:
        return 0.0


def test_a_new_loss_is_one_class(monkeypatch):
    """Openness: a Loss subclass registered in LOSSES works in the model (gradient against autograd),
    the flow (the loss descends to a stationary point) and training (TrainConfig accepts it), and says
    that it has no closed form; nothing else in the library was told about it."""
    from ufm.training import TrainConfig

    monkeypatch.setitem(LOSSES, "pseudo_huber", PseudoHuber)
    problem = UFMProblem(3, 2, 0.02, 0.02, loss="pseudo_huber", label_smoothing=0.1)
    params = UFMParams.random(problem, 4, rng=0)
    _, grad = loss_and_grad(problem, params)
    tensors = [torch.tensor(a, requires_grad=True) for a in params.arrays()]
    torch_loss(problem, tensors[0], tensors[1:2], tensors[2]).backward()
    np.testing.assert_allclose(
        grad.ravel(), np.concatenate([t.grad.numpy().ravel() for t in tensors]), rtol=1e-10
    )
    r = gradient_flow(problem, params, metrics=False)
    assert r.status == 1 and np.all(np.diff(r.loss) <= 1e-12)
    with pytest.raises(NoClosedForm, match="pseudo_huber"):
        problem.loss.closed_form(problem)
    assert TrainConfig(loss="pseudo_huber", label_smoothing=0.1).data_loss == PseudoHuber(0.1)


def test_a_new_loss_over_column_blocks_matches_autograd(monkeypatch):
    """A loss that defines only value_and_grad gets the blocked gradient through the default
    Loss.value_and_grad_into (its mean over a block rescaled by B/n): several blocks of columns give
    the gradient of the mean over all n examples (torch autograd as the reference)."""
    import ufm.model as model

    monkeypatch.setattr(model, "SCRATCH_MIN", 3 * 4)  # 4 columns a block: blocks of 4, 4, 4, 3
    monkeypatch.setattr(model, "SCRATCH_SHARE", 0.0)
    monkeypatch.setitem(LOSSES, "pseudo_huber", PseudoHuber)
    problem = UFMProblem(3, (5, 6, 4), 0.02, 0.02, loss="pseudo_huber", label_smoothing=0.1)
    params = UFMParams.random(problem, 4, rng=5)
    assert len(model.GradientWork(problem, params).blocks) == 4
    value, grad = loss_and_grad(problem, params)
    tensors = [torch.tensor(a, requires_grad=True) for a in params.arrays()]
    t_loss = torch_loss(problem, tensors[0], tensors[1:2], tensors[2])
    t_loss.backward()
    assert value == pytest.approx(t_loss.item(), rel=1e-13)
    np.testing.assert_allclose(
        grad.ravel(), np.concatenate([t.grad.numpy().ravel() for t in tensors]), rtol=1e-10
    )
