"""Gradient flow d theta/dt = -grad L(theta) of the UFM, integrated as an ODE (docs/theory.md §13).

Everyone else runs plain GD; here the flow itself is integrated, to a stated accuracy, until it is
stationary (||grad L|| < tol), reaches t_max, or spends its budget of gradient evaluations or seconds.
The integrators are objects of one registry (``ufm.dynamics.integrators.METHODS``); this module is the
one driver: it builds the vector field, records the state at the requested times, keeps the dense
output, applies the stopping rules and the budget, and turns faults into a status and a message.

The exact split. -grad L = Lambda theta + R(theta) with Lambda = -diag(lam_h on H, lam_k on W_k,
lam_b + c on the bias slot), c the loss's constant bias curvature (1 for the square loss, whose bias
Hessian is exactly I; 0 for cross-entropy). R is defined as the remainder, so the split is exact;
ETD2 treats Lambda exactly, and implicit methods get it as their approximate Jacobian.

Mean-output coordinates. For a depth-1 model with a bias and a loss of constant bias curvature the
flow runs in (H, W, m), m = W mu_G + b the mean output: b and the n feature columns are coupled
through d(db/dt)/dh_i = -W/n, a block of norm ||W||_op/sqrt(n) (0.10 at (C, N, p) = (10, 100, 64),
lam = 5e-4) that caps explicit steps near h ~ 20; in (H, W, m) the fast mode sits in Lambda alone and
the remainder's radius drops to about (||W||_op^2 + ||H||_op^2)/n (measured 0.0195 there). This is a
change of variables, not a new flow (dm/dt = dW/dt mu_G + W dmu_G/dt + db/dt, one gradient per
evaluation); records, ``params`` and dense output are read back in (H, W, b).

Measured (``benchmarks/bench_flow.py``, one thread, to a loss 1e-6 above the closed form, lam = 5e-4):
at (C, N, p) = (10, 100, 64) GD at its largest stable step takes 8183 gradients; ETD2 339, 432, 770 at
rtol 1e-2, 1e-3, 1e-4; BDF 1585 at rtol 1e-5. At (100, 50, 256): GD 7791; ETD2 69, 148, 430; BDF 444.

Deep ReLU variants: the field is discontinuous where a hidden pre-activation crosses 0, and gradient
flow can slide along such a kink; adaptive steps then shrink to ~1e-4 (about 1e4 gradient evaluations
per unit of time at (C, N, p) = (3, 2, 4)). Integrate them over short horizons, or use GD/SGD.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.integrate import OdeSolution

from .._validation import check_choice, check_nonneg, check_positive, check_positive_int
from ..critical import STATIONARY_TOL, CriticalPoint, classify_point
from ..geometry import mean_cosine
from ..model import (
    GradientWork,
    UFMParams,
    UFMProblem,
    check_params,
    check_weights,
    last_features,
    loss,
    loss_and_grad,
    loss_and_grad_norm,
    outputs,
    torch_loss,
)
from .integrators import METHODS, Diagonal, Evaluator, FlowDiverged, Integrator, default_method
from .moments import (
    UNAVAILABLE,
    MomentState,
    _split,
    moment_record,
    moment_velocity,
    moments_from_params,
    scatter_factor,
    use_moments,
)

# Budgets of a run that names none: far above what any benchmark run needs (ETD2 took at most 2191
# gradients, DOP853 29464 at (10, 100, 64)), and small enough that a run of a small problem stays in
# seconds (about 30 us a gradient at (3, 3, 4)) and a large one ends within minutes.
DEFAULT_MAX_NFEV = 200_000
DEFAULT_MAX_SECONDS = 600.0

STATUS_MESSAGES = {
    -1: "failed",
    0: "reached t_max",
    1: "stationary: ||grad L|| < tol",
    2: "reached the target loss",
    3: "stopped: the budget of gradient evaluations (max_nfev) is spent",
    4: "stopped: the time budget (max_seconds) is spent",
}


@dataclass(frozen=True)
class FlowResult:
    """A trajectory of gradient flow (or of another flow of the UFM parameters).

    Attributes
    ----------
    t : (k,) recorded times, increasing, the last one the final time.
    loss : (k,) loss at those times.
    metrics : name -> (k,) array: ``grad_norm``, ``cos_w`` (mean pairwise cosine of the rows of W),
        ``eps`` and every scalar of ``ufm.metrics.nc_metrics`` (nc1, nc2_*, nc3, nc4, ...), plus
        flow-specific entries (e.g. ``rho_k`` for the normalized flow). NaN marks a measure that is
        undefined at that time (e.g. NC1 when the class means coincide, as at the zero solution).
    params : final state: UFMParams, or the MomentState (W_k, b, M, S) of a moment flow
        (docs/theory.md §11).
    grad_norm : ||grad L|| at the final state.
    nfev : number of gradient evaluations (of the vector field).
    success : True when the run ended as asked: stationary, at the target loss or at t_max.
    status : -1 failed (diverged or stuck), 0 reached t_max, 1 stationary, 2 reached the target loss,
        3 spent max_nfev, 4 spent max_seconds (``STATUS_MESSAGES``).
    message : what happened, with the cause and the last good time on failure.
    method : the integrator.
    sol : dense output ``sol(t) -> (n_params,)`` of the flat state (``UFMParams.ravel`` order, or the
        flow's own state), or None unless requested.
    critical : what the end point is (``ufm.critical.CriticalPoint``: geometry, ||grad L||, extreme
        Hessian eigenvalues, "minimum" / "saddle" / "stationary" / "not_stationary";
        docs/theory.md §13.7), computed once at the end; None when the run was asked not to
        (``classify=False``) or failed at a state whose loss overflows.
        flow's own state: ``MomentState.ravel`` for a moment flow), or None unless requested.
    unavailable : measure -> why this flow cannot give it (a moment flow has no individual examples,
        so no NC4); those measures are absent from ``metrics``.
    """

    t: np.ndarray
    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    params: UFMParams | MomentState
    grad_norm: float
    nfev: int
    success: bool
    status: int
    message: str
    method: str
    sol: Callable[[float], np.ndarray] | None = field(default=None, repr=False)
    critical: CriticalPoint | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def t_final(self) -> float:
        return float(self.t[-1])


@dataclass
class _System:
    """A flow on a flat state y: the vector field and how to read the state as UFM parameters.

    ``field(y) -> (loss, dy/dt, stationarity)`` in NumPy; ``stationarity`` is the norm the stopping
    rule compares with ``tol`` (||grad L|| for gradient flow). ``y0`` is the start state, the run's
    own: a system serves one run, and the driver lets the integrator reuse y0's memory once it has
    stepped past it. ``linear`` is the diagonal Lambda of the module docstring, as its runs.
    ``torch_field`` (optional) is the same triple on torch tensors of any device.
    ``extra(y)`` adds flow-specific scalars to the record. ``to_flat(y)`` (optional) maps the state to
    ``UFMParams.ravel`` order when the state is in other coordinates, so that dense output is in it.
    ``stationarity_is_grad_norm`` lets the records reuse the stationarity as ||grad L||.
    ``record(y)`` (optional) gives the record's measures instead of ``record_state(to_params(y))``;
    ``unavailable`` names the measures the flow cannot give, and why. ``tolerance_scale`` (optional):
    per-entry factors (on atol, on rtol) of the integrator's tolerances, for a state whose entries do
    not count as the full flow's do (the moment flow). ``field_into(y, out)``
    (optional) is ``field`` writing dy/dt into the state-sized ``out`` (and returning it), so that an
    integrator can hand the arrays it is done with back for the next evaluations (``Evaluator``).
    ``loss_and_stationarity(y)`` (optional) is ``field``'s loss and stationarity without dy/dt, for the
    records at interpolated states: no state-sized array beside y (docs/theory.md §13.3).
    ``params_view(y)`` (optional) is ``to_params`` without the copy (views of y where the coordinates
    allow), for a record's measures, which read it at once.
    """

    problem: UFMProblem
    y0: np.ndarray
    field: Callable[[np.ndarray], tuple[float, np.ndarray, float]]
    to_params: Callable[[np.ndarray], Any]
    linear: Diagonal | np.ndarray
    torch_field: Callable[[Any], tuple[Any, Any, Any]] | None = None
    extra: Callable[[np.ndarray], dict[str, float]] | None = None
    to_flat: Callable[[np.ndarray], np.ndarray] | None = None
    stationarity_is_grad_norm: bool = True
    record: Callable[[np.ndarray], dict[str, float]] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    tolerance_scale: tuple[np.ndarray, np.ndarray] | None = None
    field_into: Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray, float]] | None = None
    loss_and_stationarity: Callable[[np.ndarray], tuple[float, float]] | None = None
    params_view: Callable[[np.ndarray], Any] | None = None


def linear_part(problem: UFMProblem, like: UFMParams) -> Diagonal:
    """Diagonal Lambda (flat, ``ravel`` order) of the exact split -grad L = Lambda theta + R(theta),
    as its runs (``np.asarray`` gives the vector).

    Weight decays on H and on each W_k, and on b: lam_b plus the loss's constant bias curvature.
    """
    return Diagonal.of(decay_parts(problem, like.H.size, like.Ws, like.b))


def decay_parts(
    problem: UFMProblem, features: int, Ws: Sequence[np.ndarray], b: np.ndarray | None
) -> list[tuple[int, float]]:
    """(size, entry of Lambda) pairs of the features (``features`` entries: H, or the class means of a
    moment state), of each W_k and of b (if any), in ``ravel`` order: the decays, on b plus the loss's
    constant bias curvature."""
    parts = [(features, -problem.lam_h)]
    parts += [(Wk.size, -lam) for lam, Wk in zip(problem.lam_layers, Ws)]
    if b is not None:
        parts.append((b.size, -(problem.lam_b + problem.loss.bias_curvature)))
    return parts


class _FlatCoordinates:
    """The flat parameter vector itself (``UFMParams.ravel`` order) as the state."""

    @staticmethod
    def to_state(theta: Any) -> Any:
        return theta

    @staticmethod
    def to_flat(y: Any) -> Any:
        return y

    @staticmethod
    def feature_sum(y: Any) -> None:
        """Nothing: the maps of these coordinates need no sum over the examples."""
        return None

    @staticmethod
    def velocity(theta: Any, dtheta: Any, h_sum: Any = None, dh_sum: Any = None) -> Any:
        return dtheta

    @staticmethod
    def velocity_sum(problem: UFMProblem, params: UFMParams, dtheta: Any, h_sum: Any) -> None:
        """Nothing: the velocity of these coordinates needs no sum over the examples."""
        return None

    @staticmethod
    def params(like: UFMParams, y: np.ndarray, h_sum: Any = None) -> UFMParams:
        """The parameters at state y, as views of y (no copy)."""
        return UFMParams.unravel(like, y)


class _MeanOutputCoordinates:
    """State (H, W, m) for the depth-1 UFM with a bias, m = W mu_G + b the mean output (C,).

    A change of variables, so the flow is the same; module docstring for why. ``theta`` is the flat
    (H, W, b) of ``UFMParams.ravel``; the state keeps its layout with m in the slot of b. The maps use
    slicing, reshape, ``@`` and ``sum`` only, so they serve NumPy arrays and torch tensors alike.
    """

    def __init__(self, like: UFMParams):
        self.p, self.n = like.H.shape
        self.C = like.b.size
        self.k = like.H.size

    def _H_W(self, y: Any) -> tuple[Any, Any]:
        H = y[: self.k].reshape(self.p, self.n)
        return H, y[self.k : self.k + self.C * self.p].reshape(self.C, self.p)

    def feature_sum(self, y: Any) -> Any:
        """H 1 (p,), n mu_G: the maps below take it (``h_sum``) where the caller has it, which saves
        them a pass over H each (the NumPy field computes it once an evaluation)."""
        return self._H_W(y)[0].sum(1)

    def _mean_output_shift(self, y: Any, h_sum: Any = None) -> Any:
        """W mu_G (C,), the same in both coordinates (H and W are shared)."""
        W = self._H_W(y)[1]
        return W @ (self.feature_sum(y) if h_sum is None else h_sum) / self.n

    def to_state(self, theta: Any) -> Any:
        y = theta + 0
        y[-self.C :] = theta[-self.C :] + self._mean_output_shift(theta)
        return y

    def to_flat(self, y: Any) -> Any:
        theta = y + 0
        theta[-self.C :] = y[-self.C :] - self._mean_output_shift(y)
        return theta

    def velocity(self, theta: Any, dtheta: Any, h_sum: Any = None, dh_sum: Any = None) -> Any:
        """dy/dt from d theta/dt: dm/dt = dW/dt mu_G + W dmu_G/dt + db/dt (the chain rule).

        Written into ``dtheta`` (every caller passes a fresh array); ``theta`` may be the state y
        itself, since only H and W are read and they are shared. ``h_sum`` and ``dh_sum`` are H 1 and
        dH/dt 1 (``feature_sum``, ``velocity_sum``) where the caller has them."""
        W = self._H_W(theta)[1]
        dH, dW = self._H_W(dtheta)
        h_sum = self.feature_sum(theta) if h_sum is None else h_sum
        dh_sum = dH.sum(1) if dh_sum is None else dh_sum
        dtheta[-self.C :] += (dW @ h_sum + W @ dh_sum) / self.n
        return dtheta

    @staticmethod
    def velocity_sum(problem: UFMProblem, params: UFMParams, dtheta: np.ndarray, h_sum: np.ndarray) -> Any:
        """dH/dt 1 (p,) of dtheta = -grad L at ``params`` (flat, ``ravel`` order; depth 1) without a
        pass over dH: dH/dt = W^T D - lam_h H and db/dt = D 1 - lam_b b with D = -dL/df (C, n)
        (``loss_and_grad``), so dH/dt 1 = W^T (db/dt + lam_b b) - lam_h H 1."""
        db = dtheta[-params.b.size :]
        return params.W.T @ (db + problem.lam_b * params.b) - problem.lam_h * h_sum

    def params(self, like: UFMParams, y: np.ndarray, h_sum: Any = None) -> UFMParams:
        """The parameters (H, W, b) at state y: H and W are views of y, b = m - W mu_G (no state copy)."""
        H, W = self._H_W(y)
        return UFMParams(H, (W,), y[-self.C :] - self._mean_output_shift(y, h_sum))


def _coordinates(problem: UFMProblem, like: UFMParams) -> _FlatCoordinates | _MeanOutputCoordinates:
    """Mean-output coordinates where they remove the stiff bias coupling (depth 1, a loss whose bias
    curvature is constant, a bias)."""
    if problem.depth == 1 and problem.loss.mean_output_coordinates and like.b is not None:
        return _MeanOutputCoordinates(like)
    return _FlatCoordinates()


def _gradient_system(problem: UFMProblem, start: UFMParams) -> _System:
    coords = _coordinates(problem, start)

    work: GradientWork | None = None  # the gradient's scratch, made at the first evaluation

    def field_into(y: np.ndarray, out: np.ndarray) -> tuple[float, np.ndarray, float]:
        nonlocal work
        work = GradientWork(problem, start) if work is None else work
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            h_sum = coords.feature_sum(y)
            params = coords.params(start, y, h_sum)
            value, _ = loss_and_grad(problem, params, out=out, work=work, negate=True)
            norm = float(np.linalg.norm(out))  # ||grad L||
            dh_sum = coords.velocity_sum(problem, params, out, h_sum)
            return value, coords.velocity(y, out, h_sum, dh_sum), norm

    def field_np(y: np.ndarray) -> tuple[float, np.ndarray, float]:
        return field_into(y, np.empty_like(y))

    def loss_and_stationarity(y: np.ndarray) -> tuple[float, float]:
        # Its scratch is made for each record, not kept: at least 2^16 entries (SCRATCH_MIN), which is
        # a state of its own on a small flow, and records are rare beside evaluations.
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            return loss_and_grad_norm(problem, coords.params(start, y))

    field_flat = _torch_gradient_field(problem, start)

    def field_torch(y: Any) -> tuple[Any, Any, Any]:
        theta = coords.to_flat(y)
        value, dtheta = field_flat(theta)
        return value, coords.velocity(theta, dtheta), (dtheta**2).sum() ** 0.5

    try:
        with np.errstate(over="raise", invalid="raise"):
            y0 = coords.to_state(start.ravel().copy())
    except FloatingPointError as err:
        raise ValueError(f"the start: its mean output overflows ({err}); scale it down") from None
    return _System(
        problem=problem,
        y0=y0,
        field=field_np,
        field_into=field_into,
        loss_and_stationarity=loss_and_stationarity,
        to_params=functools.partial(_params_copy, start, coords),
        params_view=functools.partial(coords.params, start),
        linear=linear_part(problem, start),
        torch_field=field_torch,
        to_flat=None if isinstance(coords, _FlatCoordinates) else coords.to_flat,
    )


def _params_copy(
    like: UFMParams, coords: _FlatCoordinates | _MeanOutputCoordinates, y: np.ndarray
) -> UFMParams:
    """The parameters at state y, in arrays of their own (one copy of the state, not two)."""
    y = np.asarray(y, dtype=float)
    theta = coords.to_flat(y)
    return UFMParams.unravel(like, theta.copy() if theta is y else theta)


def _torch_gradient_field(problem: UFMProblem, like: UFMParams) -> Callable[[Any], tuple[Any, Any]]:
    """-grad L on a flat float64 torch tensor, by autograd of ``model.torch_loss`` (any device)."""
    sizes = [a.size for a in like.arrays()]
    shapes = [a.shape for a in like.arrays()]
    n_w = len(like.Ws)

    def field_torch(y: Any) -> tuple[Any, Any]:
        import torch  # here, not above: only ETD2 on a torch device needs it

        parts = [p.view(s).detach().requires_grad_(True) for p, s in zip(torch.split(y, sizes), shapes)]
        H, Ws = parts[0], parts[1 : 1 + n_w]
        b = parts[1 + n_w] if like.b is not None else None
        value = torch_loss(problem, H, Ws, b)
        grads = torch.autograd.grad(value, parts)
        return value.detach(), -torch.cat([g.reshape(-1) for g in grads])

    return field_torch


class _MomentMeanOutput:
    """The moment state with m = W mu_G + b in the slot of b, mu_G = M N/n the mean feature: the
    mean-output coordinates of docs/theory.md §13.2 for the moment flow (depth 1, a bias)."""

    def __init__(self, problem: UFMProblem, like: MomentState):
        self.like = like
        self.weights = np.asarray(problem.counts, dtype=float) / problem.n  # (C,) = N/n
        i = like.M.size + like.W.size
        self.slot = slice(i, i + problem.C)

    def _w(self, y: Any) -> Any:
        if isinstance(y, np.ndarray):
            return self.weights
        return y.new_tensor(self.weights)

    def _shift(self, y: Any) -> Any:
        M, Ws, _, _ = _split(self.like, y)
        return Ws[-1] @ (M @ self._w(y))

    def to_state(self, theta: Any) -> Any:
        y = theta + 0
        y[self.slot] = theta[self.slot] + self._shift(theta)
        return y

    def to_flat(self, y: Any) -> Any:
        theta = y + 0
        theta[self.slot] = y[self.slot] - self._shift(y)
        return theta

    def velocity(self, theta: Any, dtheta: Any) -> Any:
        """dm/dt = dW/dt mu_G + W dmu_G/dt + db/dt."""
        M, Ws, _, _ = _split(self.like, theta)
        dM, dWs, _, _ = _split(self.like, dtheta)
        w = self._w(theta)
        dy = dtheta + 0
        dy[self.slot] = dtheta[self.slot] + dWs[-1] @ (M @ w) + Ws[-1] @ (dM @ w)
        return dy


def moment_linear_part(problem: UFMProblem, like: MomentState) -> Diagonal:
    """Diagonal Lambda (``MomentState.ravel`` order, the factor L in the slot of S) of the exact split of
    the moment flow: lam_h on M and on L, lam_k on W_k, lam_b + 1 on b (the square loss's bias
    curvature) (docs/theory.md §11)."""
    return Diagonal.of([*decay_parts(problem, like.M.size, like.Ws, like.b), (like.S.size, -problem.lam_h)])


def moment_tolerance_scale(problem: UFMProblem, like: MomentState) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry factors (on atol, on rtol) that give the moment flow the full flow's error norm.

    The full flow's RMS runs over H's n p entries and the weights; H = M E^T + D, so an error in
    mu_c counts N_c times and the deviations' error counts as ||E_D||_F, which equals the factor's
    ||E_L||_F (docs/theory.md §11.1). Weights w (N_c on M's column c, 1 elsewhere) and the full
    count n_full are folded into the tolerances, f = sqrt(n_full / (n_moment w)), and rtol on L is
    scaled by sqrt(p/n): an entry of L is sqrt(n/p) times an entry of D in size.
    """
    p, C, n = like.p, problem.C, problem.n
    n_weights = sum(Wk.size for Wk in like.Ws) + (0 if like.b is None else C)
    n_full, n_moment = n * p + n_weights, like.ravel().size
    w = np.concatenate([np.repeat(np.asarray(problem.counts, dtype=float), p).reshape(C, p).T.ravel(),
                        np.ones(n_moment - like.M.size)])  # fmt: skip
    f = np.sqrt(n_full / (n_moment * w))
    r = np.ones(n_moment)
    r[n_moment - like.S.size :] = np.sqrt(p / n)
    return f, f * r


def _moment_system(problem: UFMProblem, start: MomentState) -> _System:
    """The moment flow of docs/theory.md §11 as a flat system on (M, W_k, b, L), S = L L^T, in
    mean-output coordinates where the full flow uses them."""
    mean_output = problem.depth == 1 and problem.loss.mean_output_coordinates and start.b is not None
    coords = _MomentMeanOutput(problem, start) if mean_output else _FlatCoordinates()

    def velocity(theta: Any, cat: Callable[[list[Any]], Any]) -> tuple[Any, Any, Any]:
        M, Ws, b, L = _split(start, theta)
        value, (dM, dWs, db, dL), grad_sq = moment_velocity(problem, M, Ws, b, L)
        parts = (
            [dM.reshape(-1), *[d.reshape(-1) for d in dWs]] + ([] if db is None else [db]) + [dL.reshape(-1)]
        )
        return value, cat(parts), grad_sq

    def field_np(y: np.ndarray) -> tuple[float, np.ndarray, float]:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            theta = coords.to_flat(y)
            value, dtheta, grad_sq = velocity(theta, np.concatenate)
            return float(value), coords.velocity(theta, dtheta), float(np.sqrt(max(float(grad_sq), 0.0)))

    def field_torch(y: Any) -> tuple[Any, Any, Any]:
        import torch  # here, not above: only a flow on a torch device needs it

        theta = coords.to_flat(y)
        value, dtheta, grad_sq = velocity(theta, torch.cat)
        return value, coords.velocity(theta, dtheta), grad_sq.clamp(min=0.0) ** 0.5

    def factored(y: np.ndarray) -> tuple[MomentState, np.ndarray]:
        """(the MomentState, its factor L) of a flow state."""
        M, Ws, b, L = _split(start, coords.to_flat(np.array(y, dtype=float)))
        S = L @ L.T
        return MomentState(tuple(Ws), b, M, 0.5 * (S + S.T)), L

    def to_params(y: np.ndarray) -> MomentState:
        return factored(y)[0]

    def record(y: np.ndarray) -> dict[str, float]:
        state, L = factored(y)
        return moment_record(problem, state, factor=L)

    theta0 = MomentState(start.Ws, start.b, start.M, scatter_factor(start.S)).ravel()
    try:
        with np.errstate(over="raise", invalid="raise"):
            y0 = coords.to_state(theta0)
    except FloatingPointError as err:
        raise ValueError(f"the start: its mean output overflows ({err}); scale it down") from None
    return _System(
        problem=problem, y0=y0, field=field_np, to_params=to_params,
        linear=moment_linear_part(problem, start), torch_field=field_torch,
        to_flat=lambda y: to_params(y).ravel(), record=record,
        tolerance_scale=moment_tolerance_scale(problem, start),
        unavailable=UNAVAILABLE | {"critical": _NOT_CLASSIFIED},
    )  # fmt: skip


def _check_moment_state(problem: UFMProblem, state: MomentState) -> None:
    """Raise a ValueError naming the first array of a moment state that does not fit ``problem``."""
    from .._validation import check_finite, check_shape

    p = state.M.shape[0] if state.M.ndim == 2 else None
    check_shape("M (class means)", state.M, (p, problem.C))
    check_shape("S (within-class scatter)", state.S, (p, p))
    check_weights(problem, state.Ws, state.b, p, owner="the moment state", b_name="the moment state's b")
    for name, a in zip(["M", *[f"W_{k + 1}" for k in range(problem.depth)], "b"], state.arrays()[:-1]):
        check_finite(name, a)
    check_finite("S", state.S)
    if not np.array_equal(state.S, state.S.T):
        raise ValueError("S (within-class scatter) must be exactly symmetric; use (S + S.T)/2")


def record_state(problem: UFMProblem, params: UFMParams) -> dict[str, float]:
    """Loss, eps, cos_w and the scalar NC measures of ``ufm.metrics.nc_metrics`` at one state.

    ``eps`` is 1 minus the mean correct-class output (docs/theory.md §4). Measures that ``nc_metrics``
    cannot define at this state (coinciding class means) are NaN.
    """
    from ..metrics import nc_metrics

    f = outputs(problem, params)  # (C, n)
    labels = problem.labels
    rec = {
        "loss": loss(problem, params),
        "eps": 1.0 - float(np.mean(f[labels, np.arange(problem.n)])),
        "cos_w": mean_cosine(params.W),
        "norm_w_sq": float(np.sum(params.W**2)),
        "norm_h_sq": float(np.vdot(params.H, params.H)),  # no (p, n) temporary
    }
    layers = params.Ws if problem.depth > 1 else None
    try:
        nc = nc_metrics(
            last_features(problem, params).T, labels, params.W, params.b, outputs=f.T, layers=layers
        )
        for k, v in nc.as_dict().items():
            if k not in rec and isinstance(v, int | float) and not isinstance(v, bool):
                rec[k] = float(v)
    except ValueError:
        pass  # undefined measures are filled with NaN by the caller
    return rec


def _stack_records(records: list[dict[str, float]]) -> dict[str, np.ndarray]:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return {k: np.array([r.get(k, np.nan) for r in records], dtype=float) for k in keys}


def _default_t_eval(t_max: float, n_records: int) -> np.ndarray:
    """0 and ``n_records - 1`` log-spaced times up to t_max (the flow moves fast early, slowly late)."""
    if t_max == 0 or n_records < 2:
        return np.array([0.0, t_max])[: 1 if t_max == 0 else 2]
    return np.concatenate([[0.0], np.geomspace(min(1e-2, t_max), t_max, n_records - 1)])


class _Progress:
    """tqdm bar on stderr, in percent of the way to the nearest stopping rule; a no-op when disabled.

    The stationarity measure decays roughly exponentially along the flow, so its share of the way
    from the start's value down to ``tol`` is measured in log scale; the budgets (t_max, max_nfev,
    max_seconds) count linearly. The bar shows the largest of these shares (whichever rule will
    stop the run first), never moving backwards, and tqdm's time estimate extrapolates from it.
    """

    def __init__(
        self, enabled: bool, desc: str, *, tol: float, t_max: float, max_nfev: int, max_seconds: float
    ):
        self.bar = None
        if enabled:
            from .._progress import progress_bar

            # Asked for explicitly (progress=True): shown on any stderr, not only a terminal.
            self.bar = progress_bar(
                total=100, desc=desc, unit="%", leave=False, bar_format=_BAR_FORMAT, terminal_only=False
            )
        self.limits = (tol, t_max, max_nfev, max_seconds)
        self.start_stat: float | None = None
        self.done = 0.0

    def share(self, t: float, stat: float, nfev: int, seconds: float) -> float:
        """Fraction in [0, 1] of the way to the first stopping rule to fire."""
        tol, t_max, max_nfev, max_seconds = self.limits
        if self.start_stat is None:
            self.start_stat = stat
        shares = [t / t_max if t_max > 0 else 1.0, nfev / max_nfev, seconds / max_seconds]
        if tol > 0 and self.start_stat > tol and stat > 0:
            shares.append(np.log(self.start_stat / stat) / np.log(self.start_stat / tol))
        return float(np.clip(max(shares), 0.0, 1.0))

    def update(self, t: float, stat: float, nfev: int, seconds: float) -> None:
        if self.bar is None:
            return
        done = max(self.done, 100 * self.share(t, stat, nfev, seconds))
        self.bar.update(done - self.done)
        self.bar.set_postfix_str(f"t={t:.3g}, stationarity={stat:.2g}", refresh=False)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Percent to the nearest stopping rule, then tqdm's elapsed<remaining estimate.
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


def _check_t_eval(t_eval, t_max: float, n_records: int) -> np.ndarray:
    if t_eval is None:
        t_eval = _default_t_eval(t_max, check_positive_int("n_records", n_records))
    t_eval = np.asarray(t_eval, dtype=float)
    if (
        t_eval.ndim != 1
        or not np.all(np.isfinite(t_eval))
        or np.any(np.diff(t_eval) <= 0)
        or (t_eval.size and (t_eval[0] < 0 or t_eval[-1] > t_max))
    ):
        raise ValueError("t_eval must be increasing times in [0, t_max]")
    if not t_eval.size or t_eval[-1] < t_max:
        t_eval = np.append(t_eval, t_max)
    return t_eval


def gradient_flow(
    problem: UFMProblem,
    start: UFMParams,
    *,
    method: str | None = None,
    t_max: float = 1e6,
    tol: float = 1e-8,
    rtol: float | None = None,
    atol: float | None = None,
    t_eval: Sequence[float] | np.ndarray | None = None,
    n_records: int = 60,
    metrics: bool = True,
    target_loss: float | None = None,
    dense_output: bool = False,
    progress: bool = False,
    device: str = "cpu",
    max_nfev: int | None = None,
    max_seconds: float | None = None,
    classify: bool = True,
    moments: bool | None = None,
) -> FlowResult:
    """Integrate d theta/dt = -grad L(theta) from ``start`` until ||grad L|| < tol or t = t_max.

    Parameters
    ----------
    problem : the model (any depth, bias, loss, class counts).
    start : initial parameters theta(0) (H (p, n), W_k, b), or a MomentState (W_k, b, M, S), whose
        flow is the moment flow.
    method : a name in ``METHODS``; None is ``default_method(rtol)``: ETD2 (docs/theory.md §13.6), or
        DOP853 when rtol < 1e-7 is asked for (ETD2 is second order).
    t_max : final time if the flow is not stationary before.
    tol : stationarity threshold on ||grad L||_2, checked on accepted steps.
    rtol, atol : local error tolerances; None takes the method's ``default_tolerances(tol)``.
    t_eval : times at which loss and measures are recorded (default: 0 and ``n_records - 1``
        log-spaced times up to t_max); the final time is always recorded.
    metrics : record the NC measures (else loss and grad_norm only).
    target_loss : also stop (status 2) once the loss is <= this value.
    dense_output : keep a dense interpolant ``sol`` of the flat state.
    progress : show a tqdm bar over t on stderr.
    device : torch device for ``ETD2`` ("cpu" uses the analytic NumPy gradient, others torch autograd).
    max_nfev, max_seconds : the budget; None takes DEFAULT_MAX_NFEV and DEFAULT_MAX_SECONDS. A run
        that spends it stops with status 3 or 4 and its state so far. The time includes measuring
        the records, which happens as the run passes their times.
    classify : classify the end point (``FlowResult.critical``; ``end_point`` below).
    moments : integrate the moment closure (W_k, b, class means M, scatter S) of docs/theory.md §11,
        the same flow at a cost independent of n: True insists (exact only for the square loss with
        linear layers; else a ValueError), False keeps H, None chooses
        (``ufm.dynamics.moments.use_moments``: moments where exact, p < n and H above
        AUTO_MOMENTS_MIN_ENTRIES entries). A moment flow's ``params`` is the MomentState, its records
        lack NC4 and the SQI residuals (``FlowResult.unavailable`` says why).

    Returns
    -------
    FlowResult
    """
    if isinstance(start, MomentState):
        if moments is False:
            raise ValueError("moments=False, but the start is a MomentState: give a UFMParams start")
        use_moments(problem, start.p, True)  # raises where the closure is not exact
        _check_moment_state(problem, start)
        system = _moment_system(problem, start)
    else:
        check_params(problem, start)
        if use_moments(problem, start.p, moments):
            system = _moment_system(problem, moments_from_params(problem, start))
        else:
            system = _gradient_system(problem, start)
    return integrate(
        system, method=method, t_max=t_max, tol=tol, rtol=rtol, atol=atol,
        t_eval=t_eval, n_records=n_records, metrics=metrics, target_loss=target_loss,
        dense_output=dense_output, progress=progress, device=device, max_nfev=max_nfev,
        max_seconds=max_seconds, classify=classify,
    )  # fmt: skip


# A moment flow's end point has no classification (FlowResult.unavailable["critical"]).
_NOT_CLASSIFIED = (
    "the end point's classification (ufm.critical) needs the Hessian in H, which a moment flow does not "
    "hold; run the full flow (moments=False) on a problem small enough to classify"
)


def end_point(
    problem: UFMProblem, params: UFMParams, tol: float, classify: bool, failed: bool
) -> CriticalPoint | None:
    """The classification of a run's end point (``ufm.critical.classify_point``), or None when not
    asked, or when a failed run's last state overflows the loss (an SGD run checked only at its
    mini-batches). A run stopped at ||grad L|| < tol counts as stationary at that tol when it is looser
    than ``STATIONARY_TOL``; the Hessian is computed up to ``HESSIAN_MAX_PARAMS`` parameters."""
    if not classify or not isinstance(params, UFMParams):  # a MomentState: _NOT_CLASSIFIED
        return None
    try:
        return classify_point(problem, params, grad_tol=max(tol, STATIONARY_TOL))
    except ValueError:
        if failed:
            return None
        raise


def _then(first: Callable[[Any], np.ndarray], second: Callable[[np.ndarray], np.ndarray]):
    """t -> second(first(t)): dense output of the state, read in other coordinates; for several times
    (first(t) of shape (size, k)) column by column, as ``second`` maps one state."""

    def composed(t):
        y = first(t)
        return second(y) if y.ndim == 1 else np.stack([second(column) for column in y.T], axis=1)

    return composed


@dataclass
class _Run:
    """What the driver collects while it steps: the records, measured as each requested time is passed
    (``measure(y, evaluated)``, the record of a host state y; ``evaluated`` the field's (loss, stat)
    there when the driver has it), and the dense-output segments. No state is kept for later: the
    memory of a run does not grow with its number of records (docs/theory.md §13.3)."""

    t_eval: np.ndarray
    measure: Callable[[np.ndarray, tuple[float, float] | None], dict[str, float]]
    ts: list[float] = field(default_factory=list)
    records: list[dict[str, float]] = field(default_factory=list)
    seg_t: list[float] = field(default_factory=list)
    segments: list[Any] = field(default_factory=list)
    next_record: int = 0

    def record(self, solver: Integrator, dense: bool, evaluated: tuple[float, float] | None) -> None:
        """Record the requested times in (t_old, t] from the last step's interpolant (built only when
        a record or the dense output needs it: for ETD2 on a device it is a copy to the host);
        ``evaluated`` is the field's (loss, stat) at the accepted state, when they are the host's."""
        t = solver.t
        if solver.t_old is None:
            self.seg_t.append(t)
        wanted = self.next_record < self.t_eval.size and self.t_eval[self.next_record] < t
        interp = solver.dense(keep=dense) if solver.t_old is not None and (dense or wanted) else None
        if dense and interp is not None:
            self.segments.append(interp)
            self.seg_t.append(t)
        while self.next_record < self.t_eval.size and self.t_eval[self.next_record] <= t:
            te = float(self.t_eval[self.next_record])
            at_state = interp is None or te == t
            y = solver.host(solver.y) if at_state else interp(te)
            self.ts.append(te)
            self.records.append(self.measure(y, evaluated if at_state else None))
            del y  # before the next record's state is made
            self.next_record += 1

    def finish(self, t: float, y: np.ndarray) -> None:
        """Make the final state (the last one that passed the check) the last record."""
        if not self.ts or self.ts[-1] < t:
            self.ts.append(t)
            self.records.append(self.measure(y, None))

    def solution(self) -> OdeSolution | None:
        return OdeSolution(self.seg_t, self.segments) if self.segments else None


def _measure(system: _System, metrics: bool, y: np.ndarray, evaluated: tuple[float, float] | None) -> dict:
    """The record of the host state y: the loss, the measures (``metrics``), ||grad L|| and the
    stationarity; ``evaluated`` is the field's (loss, stat) at y when at hand (else evaluated here)."""
    value, stat = _loss_and_stationarity(system, y) if evaluated is None else evaluated
    # The parameters (views of y, else a copy of the state) only where a measure needs them, and once.
    needs_params = (metrics and system.record is None) or not system.stationarity_is_grad_norm
    params = (system.params_view or system.to_params)(y) if needs_params else None
    if not metrics:
        rec = {"loss": value}
    else:
        rec = system.record(y) if system.record is not None else record_state(system.problem, params)
    rec["grad_norm"] = (
        stat if system.stationarity_is_grad_norm else loss_and_grad_norm(system.problem, params)[1]
    )
    rec["stationarity"] = stat
    if system.extra is not None:
        rec.update(system.extra(y))
    return rec


def _loss_and_stationarity(system: _System, y: np.ndarray) -> tuple[float, float]:
    """The field's loss and stationarity at y: the system's ``loss_and_stationarity`` (no state-sized
    array), else the field's, whose dy/dt (a state-sized array) is dropped at once."""
    if system.loss_and_stationarity is not None:
        return system.loss_and_stationarity(y)
    value, _, stat = system.field(y)
    return value, stat


def _budget(max_nfev: int | None, max_seconds: float | None) -> tuple[int, float]:
    nfev = DEFAULT_MAX_NFEV if max_nfev is None else check_positive_int("max_nfev", max_nfev)
    seconds = DEFAULT_MAX_SECONDS if max_seconds is None else check_positive("max_seconds", max_seconds)
    return nfev, seconds


def integrate(
    system: _System,
    *,
    method: str | None,
    t_max: float,
    tol: float,
    rtol: float | None,
    atol: float | None,
    t_eval: Sequence[float] | np.ndarray | None,
    n_records: int,
    metrics: bool,
    target_loss: float | None,
    dense_output: bool,
    progress: bool,
    device: str,
    max_nfev: int | None = None,
    max_seconds: float | None = None,
    classify: bool = True,
) -> FlowResult:
    """The one driver: integrate ``system`` with a registry method, record, stop, package the result."""
    method = default_method(rtol) if method is None else check_choice("method", method, METHODS)
    cls = METHODS[method]
    cls.check_device(device)
    t_max = check_nonneg("t_max", t_max)
    check_nonneg("tol", tol)
    default_rtol, default_atol = cls.default_tolerances(tol)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    budget_nfev, budget_seconds = _budget(max_nfev, max_seconds)
    run = _Run(_check_t_eval(t_eval, t_max, n_records), functools.partial(_measure, system, metrics))

    on_host = device == "cpu"
    fun = Evaluator(
        system.field if on_host else _torch_only(system),
        by_value=cls.cache_by_value,
        into=system.field_into if on_host else None,
    )
    check = fun if on_host else Evaluator(system.field)  # the start is checked on the host
    try:
        with np.errstate(over="raise", invalid="raise"):
            check(system.y0)
    except FlowDiverged as err:
        raise ValueError(
            f"the start: {err.cause}: the loss or its gradient there leaves the floating-point range; "
            "scale the start down, or the weight decays if they are that large"
        ) from None
    if system.tolerance_scale is not None:
        atol, rtol = atol * system.tolerance_scale[0], rtol * system.tolerance_scale[1]
    solver = cls(
        fun, system.y0, t_max, rtol=rtol, atol=atol, linear=system.linear, device=device, overwrite_y0=True
    )
    bar = _Progress(progress, f"flow {method}", tol=tol, t_max=t_max, max_nfev=budget_nfev,
                    max_seconds=budget_seconds)  # fmt: skip
    t_start = time.perf_counter()
    try:
        status, msg, (t_end, y_end) = _drive(solver, fun, run, tol, target_loss, t_max, dense_output, bar,
                                             budget_nfev, budget_seconds, t_start, on_host)  # fmt: skip
    finally:
        bar.close()
    y_end = solver.host(y_end)
    nfev = fun.nfev + (0 if on_host else check.nfev)
    del solver, fun, check  # the integrator's arrays other than y_end are not kept through the end
    run.finish(t_end, y_end)
    end = system.to_params(y_end)  # a copy
    del y_end
    sol = run.solution() if dense_output else None
    if sol is not None and system.to_flat is not None:
        sol = _then(sol, system.to_flat)
    result = _package(system, run, end, method, nfev, status, msg, sol)
    critical = end_point(system.problem, result.params, tol, classify, status == -1)
    return result if critical is None else replace(result, critical=critical)


def _torch_only(system: _System):
    if system.torch_field is None:
        raise ValueError("this flow has no torch vector field; use device='cpu'")
    return system.torch_field


def _drive(
    solver, fun, run, tol, target_loss, t_max, dense_output, bar, max_nfev, max_seconds, t_start, on_host
):  # fmt: skip
    """Step until a stopping rule fires; (status, message, (t, y) of the last state that passed the
    check). States are not copied: no integrator writes into a state it has accepted. A record at an
    accepted state reuses the check's loss and stationarity when the field is the host's (``on_host``;
    a device's differ from the host's in rounding)."""
    good = (solver.t, solver.y)
    while True:
        try:
            value, _, stat = fun(solver.y)
        except FlowDiverged as err:
            return -1, str(err), good
        good = (solver.t, solver.y)
        run.record(solver, dense_output, (value, stat) if on_host else None)
        fun.t_good = solver.t
        at = f" at t = {solver.t:.6g}"
        if stat < tol:
            return 1, STATUS_MESSAGES[1] + at, good
        if target_loss is not None and value <= target_loss:
            return 2, STATUS_MESSAGES[2] + at, good
        if solver.t >= t_max:
            return 0, STATUS_MESSAGES[0] + at, good
        if fun.nfev >= max_nfev:
            return (
                3,
                f"{STATUS_MESSAGES[3]}: {fun.nfev} >= {max_nfev}{at}; raise max_nfev or loosen tol",
                good,
            )
        if time.perf_counter() - t_start >= max_seconds:
            return 4, f"{STATUS_MESSAGES[4]}: {max_seconds:g} s{at}; raise max_seconds or loosen tol", good
        bar.update(solver.t, stat, fun.nfev, time.perf_counter() - t_start)
        try:
            failure = solver.step()
        except FlowDiverged as err:
            return -1, str(err), good
        if failure is not None:
            return -1, f"{failure}; last good time t = {fun.t_good:.6g}", good


def _package(system, run, end, method, nfev, status, msg, sol) -> FlowResult:
    """The FlowResult of a finished run, ``end`` its final parameters."""
    stacked = _stack_records(run.records)
    loss_t = stacked.pop("loss")
    return FlowResult(
        t=np.asarray(run.ts, dtype=float), loss=loss_t, metrics=stacked, params=end,
        grad_norm=float(stacked["grad_norm"][-1]), nfev=int(nfev), success=status in (0, 1, 2),
        status=status, message=msg, method=method, sol=sol, unavailable=dict(system.unavailable),
    )  # fmt: skip
