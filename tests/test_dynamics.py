"""Gradient flow (ufm.dynamics) against the closed form, an independent reference solver and exact invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufm.closed_form import ufm_optimum
from ufm.dynamics import gradient_flow
from ufm.dynamics.flow import _FlatCoordinates, _gradient_system, _MeanOutputCoordinates
from ufm.model import UFMParams, UFMProblem, loss_and_grad, outputs

# Stationarity at ||grad|| < 1e-9 puts the state within ~1e-9/lam_min of the minimizer (lam_min
# >= 1e-2 here), far inside the 1e-6 we assert. The reference solver runs at rtol 1e-10.
TOL_CLOSED = 1e-6
REF = {"method": "DOP853", "rtol": 1e-12, "atol": 1e-14}

# (C, N, p, lam_w, lam_h, bias): both sides of the collapse threshold delta = C sqrt(N lam_w lam_h) = 1.
CASES = [
    (3, 4, 5, 0.02, 0.02, True),  # delta = 0.12
    (4, 3, 6, 0.05, 0.01, True),  # unequal decays, delta = 0.16
    (3, 4, 5, 0.02, 0.03, False),  # no bias: orthogonal frame, delta = 0.147
    (3, 2, 4, 0.5, 0.5, True),  # delta = 2.1 > 1: the zero solution
    (3, 2, 4, 0.4, 0.6, False),  # delta = 2.08 > 1, no bias
]


@pytest.mark.parametrize(("C", "N", "p", "lam_w", "lam_h", "bias"), CASES)
def test_flow_reaches_closed_form(C, N, p, lam_w, lam_h, bias):
    """docs/theory.md §5, §13: from a random start the flow's limit is the closed-form global minimizer."""
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias)
    opt = ufm_optimum(C, N, lam_w, lam_h, bias=bias)
    r = gradient_flow(problem, UFMParams.random(problem, p, rng=1), tol=1e-9, **REF, n_records=5)
    assert r.success and r.status == 1, r.message
    assert r.loss[-1] == pytest.approx(opt.loss, rel=TOL_CLOSED)
    assert r.metrics["eps"][-1] == pytest.approx(opt.eps, abs=TOL_CLOSED)
    if opt.collapsed:
        assert r.metrics["cos_w"][-1] == pytest.approx(opt.cos_w, abs=TOL_CLOSED)
        assert np.sum(r.params.W**2, axis=1) == pytest.approx(opt.w_row_norm_sq, rel=TOL_CLOSED)
        assert r.metrics["nc1"][-1] < TOL_CLOSED
    else:
        assert np.abs(r.params.W).max() < TOL_CLOSED and np.abs(r.params.H).max() < TOL_CLOSED


@pytest.mark.parametrize(
    ("method", "rtol", "tol"),
    # ETD2 keeps fixed points and caps its steps below its stability limit: a loose rtol still ends
    # stationary.
    [("RK45", 1e-11, 1e-8), ("BDF", 1e-11, 1e-8), ("LSODA", 1e-11, 1e-8), ("Radau", 1e-11, 1e-8),
     ("ETD2", 1e-6, 1e-8), ("ETD2", 1e-3, 1e-10)],
)  # fmt: skip
def test_methods_agree_with_reference_at_the_limit(method, rtol, tol):
    """Every integrator converges to the same closed form (ETD2 and BDF keep fixed points exactly)."""
    problem = UFMProblem(3, 3, 0.05, 0.05)
    opt = ufm_optimum(3, 3, 0.05, 0.05)
    r = gradient_flow(problem, UFMParams.random(problem, 4, rng=2), method=method, tol=tol, rtol=rtol,
                      atol=rtol * 1e-2, metrics=False, n_records=3)  # fmt: skip
    assert r.success and r.status == 1, r.message
    assert r.loss[-1] == pytest.approx(opt.loss, rel=TOL_CLOSED)
    # Integrated in mean-output coordinates, recorded as ||grad L|| of the (H, W, b) read back.
    assert r.grad_norm == pytest.approx(np.linalg.norm(loss_and_grad(problem, r.params)[1].ravel()), rel=1e-9)


def test_etd2_torch_path_equals_numpy_path():
    """ETD2 on a torch device (autograd of ufm.model.torch_loss) follows the NumPy path (analytic
    gradient): two independent gradients, one trajectory."""
    problem = UFMProblem(3, 2, 0.05, 0.05)
    x0 = UFMParams.random(problem, 4, rng=5)
    a, b = (gradient_flow(problem, x0, method="ETD2", t_max=20.0, tol=0.0, rtol=1e-6, atol=1e-8, metrics=False,
                          device=d) for d in ("cpu", "cpu:0"))  # fmt: skip
    np.testing.assert_allclose(b.params.ravel(), a.params.ravel(), atol=1e-9)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-11)


def test_zero_decay_interpolates():
    """lam = 0: the flow fits the targets, W H + b -> Y (no minimizer with lam = 0 is collapsed-only)."""
    problem = UFMProblem(3, 4, 0.0, 0.0)
    r = gradient_flow(problem, UFMParams.random(problem, 6, rng=3), tol=1e-9, **REF, metrics=False)
    assert r.status == 1, r.message
    assert np.abs(outputs(problem, r.params) - problem.Y).max() < 1e-6


def test_t_zero_returns_start():
    problem = UFMProblem(3, 2, 0.1, 0.1)
    x0 = UFMParams.random(problem, 4, rng=4)
    r = gradient_flow(problem, x0, t_max=0.0)
    assert r.t.tolist() == [0.0] and r.status == 0
    assert np.array_equal(r.params.ravel(), x0.ravel())


@pytest.mark.parametrize("method", ["DOP853", "ETD2"])
def test_balancedness_decays_exactly(method):
    """With lam_w = lam_h = lam, d/dt (W^T W - H H^T) = -2 lam (W^T W - H H^T) exactly (depth 1)."""
    lam = 0.03
    problem = UFMProblem(3, 4, lam, lam)
    x0 = UFMParams.random(problem, 5, rng=5)
    D0 = x0.W.T @ x0.W - x0.H @ x0.H.T
    times = np.array([0.0, 1.0, 5.0, 20.0, 60.0])
    rtol = 1e-10 if method == "DOP853" else 1e-7
    r = gradient_flow(problem, x0, method=method, t_max=60.0, t_eval=times, tol=0.0, rtol=rtol, atol=rtol * 1e-2,
                      dense_output=True, metrics=False)  # fmt: skip
    for t in times:
        P = UFMParams.unravel(x0, r.sol(t))
        D = P.W.T @ P.W - P.H @ P.H.T
        np.testing.assert_allclose(D, np.exp(-2 * lam * t) * D0, atol=1e-6 * np.abs(D0).max())


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), C=st.integers(2, 4), N=st.integers(1, 3), bias=st.booleans())
def test_loss_never_increases(seed, C, N, bias):
    """Gradient flow is a descent flow: dL/dt = -||grad L||^2 <= 0 (checked on a dense record)."""
    problem = UFMProblem(C, N, 0.05, 0.02, bias=bias)
    r = gradient_flow(problem, UFMParams.random(problem, C + 1, rng=seed), t_max=200.0, tol=0.0,
                      t_eval=np.linspace(0, 200, 101), **REF, metrics=False)  # fmt: skip
    assert np.all(np.diff(r.loss) <= 1e-12 * np.abs(r.loss[:-1]) + 1e-14)


@pytest.mark.parametrize(
    ("problem", "t_max"),
    [
        (UFMProblem(3, 2, 0.05, 0.05, depth=2, activation="linear"), 300.0),
        (UFMProblem(3, 2, 0.05, 0.05, loss="ce"), 300.0),
        # ReLU kinks: pre-activations that reach 0 make the field discontinuous, and adaptive steps
        # shrink to ~1e-4 there (about 1e4 evaluations per unit of time), so only a short horizon.
        (UFMProblem(3, 2, 0.05, 0.05, depth=2, activation="relu"), 2.0),
    ],
)
def test_deep_and_cross_entropy_flows_descend(problem, t_max):
    """The flow runs for a deep UFM (linear and ReLU) and for cross-entropy; the loss never increases."""
    r = gradient_flow(problem, UFMParams.random(problem, 4, rng=6), method="RK45", t_max=t_max, tol=1e-7,
                      rtol=1e-6, atol=1e-9, n_records=10)  # fmt: skip
    assert r.success, r.message
    assert r.loss[-1] < r.loss[0]
    assert np.all(np.diff(r.loss) <= 1e-12)


def test_overflowing_start_is_refused():
    """A start whose gradient overflows is a ValueError naming it, never a NaN result."""
    problem = UFMProblem(2, 1, 0.1, 0.1)
    x0 = UFMParams.random(problem, 2, rng=7)
    with pytest.raises(ValueError, match="start"):
        gradient_flow(problem, UFMParams(x0.H * 1e200, tuple(W * 1e200 for W in x0.Ws), x0.b))
    # Decays of 1e300 overflow the gradient of an ordinary start: the message names them too.
    with pytest.raises(
        ValueError, match="^the start: .*overflow.*or the weight decays if they are that large"
    ):
        gradient_flow(UFMProblem(2, 1, 1e300, 1e300), x0)


def test_bad_input():
    problem = UFMProblem(3, 2, 0.1, 0.1)
    x0 = UFMParams.random(problem, 4, rng=8)
    with pytest.raises(ValueError, match="valid choices"):
        gradient_flow(problem, x0, method="Euler")
    with pytest.raises(ValueError, match="t_max"):
        gradient_flow(problem, x0, t_max=-1.0)
    with pytest.raises(ValueError, match="t_eval"):
        gradient_flow(problem, x0, t_max=1.0, t_eval=[0.0, 2.0])
    for bad in ([np.nan], [0.0, np.nan, 0.5]):  # before: NaN passed every comparison and was recorded
        with pytest.raises(ValueError, match="t_eval must be increasing times in"):
            gradient_flow(problem, x0, t_max=1.0, t_eval=bad)


def test_mean_output_coordinates_are_the_chain_rule():
    """The state (H, W, m = W mu_G + b): it maps back exactly, m is the mean of ``outputs`` over the
    examples, and dm/dt is the derivative of that mean along -grad L (a central difference, exact up
    to rounding since m is quadratic in theta)."""
    problem = UFMProblem(4, 3, 0.05, 0.02)
    x = UFMParams.random(problem, 5, rng=11)
    x = UFMParams(x.H, x.Ws, np.random.default_rng(12).standard_normal(4))

    def mean_output(theta):
        return outputs(problem, UFMParams.unravel(x, theta)).mean(axis=1)

    coords = _MeanOutputCoordinates(x)
    theta = x.ravel()
    y = coords.to_state(theta)
    np.testing.assert_allclose(coords.to_flat(y), theta, rtol=0, atol=1e-14)
    np.testing.assert_allclose(y[-4:], mean_output(theta), rtol=1e-13)
    g = loss_and_grad(problem, x)[1].ravel()
    dy = coords.velocity(theta, -g)
    s = 1e-4
    np.testing.assert_allclose(
        dy[-4:], (mean_output(theta - s * g) - mean_output(theta + s * g)) / (2 * s), rtol=1e-8
    )
    np.testing.assert_array_equal(dy[:-4], -g[:-4])


@pytest.mark.parametrize("lam_b", [0.0, 0.3])
def test_numpy_field_takes_the_sums_over_examples_from_the_gradient(lam_b):
    """The NumPy field gives the velocity H 1 once and dH/dt 1 from W^T (db/dt + lam_b b) - lam_h H 1
    (``velocity_sum``, no pass over dH): the same field as the chain rule with both sums taken
    directly from the arrays (``velocity`` without them), and ||grad L|| as the stationarity."""
    problem = UFMProblem(5, 7, 0.02, 0.03, lam_b=lam_b)
    x = UFMParams.random(problem, 4, rng=21)
    x = UFMParams(x.H, x.Ws, np.random.default_rng(22).standard_normal(5))
    system = _gradient_system(problem, x)
    coords = _MeanOutputCoordinates(x)
    y = system.y0 + 0.1 * np.random.default_rng(23).standard_normal(system.y0.size)
    theta = coords.to_flat(y)
    g = loss_and_grad(problem, UFMParams.unravel(x, theta))[1].ravel()
    value, dy, stat = system.field(y)
    np.testing.assert_allclose(dy, coords.velocity(theta, -g), rtol=1e-12, atol=1e-15)
    assert stat == pytest.approx(np.linalg.norm(g), rel=1e-13)


def test_mean_output_coordinates_remove_the_bias_coupling():
    """Why ETD2 integrates the depth-1 square loss in mean-output coordinates (module docstring).

    At the minimizer, the Jacobian of the remainder R = F - Lambda y (dense, by central differences)
    has spectral radius >= ||W||_op / sqrt(n) in flat coordinates: the b <-> H coupling, d(db/dt)/dh_i
    = -W/n over n columns. In mean-output coordinates that term is gone and the radius is at most the
    data curvatures (||W||_op^2 + ||H||_op^2)/n plus the decays.
    """
    C, N, p, lam = 3, 50, 4, 1e-3
    problem = UFMProblem(C, N, lam, lam)
    x = ufm_optimum(C, N, lam, lam).build(p, rng=0)
    linear = _gradient_system(problem, x).linear

    def remainder_radius(coords):
        y0 = coords.to_state(x.ravel())

        def field(y):
            theta = coords.to_flat(y)
            return coords.velocity(theta, -loss_and_grad(problem, UFMParams.unravel(x, theta))[1].ravel())

        step = 1e-6
        cols = [(field(y0 + step * e) - field(y0 - step * e)) / (2 * step) for e in np.eye(y0.size)]
        return np.abs(np.linalg.eigvals(np.array(cols).T - np.diag(linear))).max()

    w_op, h_op, n = np.linalg.norm(x.W, 2), np.linalg.norm(x.H, 2), problem.n
    flat, mean = remainder_radius(_FlatCoordinates()), remainder_radius(_MeanOutputCoordinates(x))
    assert flat >= w_op / np.sqrt(n)
    assert mean <= (w_op**2 + h_op**2) / n + 2 * lam
    assert flat > 2 * mean


FLOW_ARGS = ["flow", "-C", "3", "-N", "4", "-p", "5", "--lam-w", "0.02", "--lam-h", "0.02"]


@pytest.mark.parametrize("bias", [True, False])
def test_flow_cli_json_beside_the_closed_form(bias, tmp_path, capsys):
    """``ufm flow --json --out``: the issue's keys, the end point at the closed form, and the files."""
    import json

    from ufm.cli import main
    from ufm.tables import read_csv

    args = FLOW_ARGS + ["--json", "--out", str(tmp_path)] + ([] if bias else ["--no-bias"])
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # The closed form typed out (ufm.closed_form docstring): delta = C sqrt(N lam_w lam_h) = 0.12,
    # k = C - 1 with a bias and C without, eps = k delta / C, loss = (k/C)(delta - delta^2/2).
    k, delta = (2 if bias else 3), 3 * np.sqrt(4 * 0.02 * 0.02)
    eps, loss = k * delta / 3, k / 3 * (delta - delta**2 / 2)
    assert out["status"] == 1 and out["grad_norm"] < 1e-8 and out["n_grad_evals"] > 0 and out["t"] > 0
    assert out["closed_form"]["eps"] == pytest.approx(eps, rel=1e-12)
    assert out["closed_form"]["loss"] == pytest.approx(loss, rel=1e-12)
    assert out["loss"] == pytest.approx(loss, rel=TOL_CLOSED)
    assert out["eps"] == pytest.approx(eps, abs=TOL_CLOSED)
    assert out["cos_w"] == pytest.approx(-0.5 if bias else 0.0, abs=TOL_CLOSED)
    assert out["nc1"] < TOL_CLOSED
    rows = read_csv(tmp_path / "trajectory.csv")
    assert rows[-1]["loss"] == out["loss"] and rows[-1]["t"] == out["t"]
    assert all(a["t"] < b["t"] for a, b in zip(rows, rows[1:]))
    assert (tmp_path / "flow.png").stat().st_size > 0


def test_flow_cli_refuses_an_unknown_method(capsys):
    from ufm.cli import main

    assert main(FLOW_ARGS + ["--method", "Euler"]) == 2
    assert "Euler" in capsys.readouterr().err
