"""Gradient flow d theta/dt = -grad L(theta) of the UFM, integrated as an ODE.

THEORY.md statement 5 asks that the closed-form minimizer be confirmed "by gradient flow from random
starts". Everyone else runs plain GD (PEERS.md); here the flow itself is integrated, to a stated
accuracy, until it is stationary (||grad L|| < tol) or reaches t_max.

Integrators (``METHODS``)
-------------------------
* ``RK23``, ``RK45``, ``DOP853``: explicit adaptive Runge-Kutta of ``scipy.integrate.solve_ivp``.
* ``BDF``, ``Radau``, ``LSODA``: implicit (stiff) methods of ``solve_ivp``. A full Jacobian (the negative
  Hessian, 1.3M x 1.3M at (C, N, p) = (100, 50, 256)) is out of reach, and finite differences of it cost
  one gradient per parameter. They get the diagonal linear part ``-Lambda`` below as an approximate
  Jacobian: it only steers their Newton iterations (more iterations when it is poor), while the
  accuracy of the solution is still set by their error estimates. LSODA needs it dense, so it is
  refused above ``DENSE_JAC_MAX`` parameters.
* ``ETD2``: an adaptive second-order exponential integrator (Cox and Matthews 2002, "ETD2RK", with the
  ETD1/ETD2 difference as error estimate; Hochbruck and Ostermann, Acta Numerica 2010), in NumPy on
  the host or in torch float64 on any device (the GPU route for large problems).

Why an exponential integrator: the flow is stiff, and not only mildly. The Hessian's top eigenvalue
is 1 + lam_b, exactly, in the bias direction (d^2 L/db^2 = I + lam_b I for the square loss, since
the data term averages over the n examples), while the slowest modes decay at rate ~ lam (features
outside the span of W decay as exp(-lam_h t); with lam_w = lam_h the imbalance W^T W - H H^T decays as
exp(-2 lam t)). The ratio is ~1/lam ~ 2000 at lam = 5e-4: explicit Runge-Kutta steps are capped by
stability at h ~ 3-6 whatever the tolerance, which is no better per gradient evaluation than GD
at its largest stable step. ETD2 splits

    F(y) = Lambda y + R(y),    Lambda = -diag(lam_h on H, lam_k on W_k, 1 + lam_b on the bias slot)

(1 + lam_b only for the square loss; lam_b for cross-entropy), treats Lambda exactly through
exp(h Lambda) and the phi-functions, and R explicitly. The split is exact (R is defined as the
remainder), so ETD2 integrates the same flow; it also keeps every fixed point of the flow exactly.
Its steps are limited by accuracy and by the spectral radius of R's Jacobian.

Mean-output coordinates. In the plain coordinates (H, W, b) that radius is still large: b and the
features are coupled through d(db/dt)/dh_i = -W/n over all n columns, a block of norm ||W||_op/sqrt(n)
(0.10 at the benchmark's (C, N, p) = (10, 100, 64), lam = 5e-4, against 1e-2 for the other data
curvatures), which caps explicit steps at h ~ 20. For the depth-1 square loss with a bias the flow is
therefore integrated in the coordinates (H, W, m), m = W mu_G + b the mean output over the examples
(``_MeanOutputCoordinates``). This is a change of variables, not a new flow: dm/dt = dW/dt mu_G +
W dmu_G/dt + db/dt by the chain rule, one gradient per evaluation as before. In them
dm/dt = -(1 + lam_b) m + (terms of size ||W||^2/n, lam), so the fast mode sits in Lambda alone and R's
radius drops to about the data curvatures (||W||_op^2 + ||H||_op^2)/n (measured 0.0195 at the
benchmark size's minimizer, where that sum is 0.0190; ``tests/test_dynamics.py`` checks both radii). Every integrator uses these coordinates (they also give
BDF's diagonal approximate Jacobian the fast mode exactly); records, ``params`` and dense output are
read back in (H, W, b). Deep and cross-entropy flows stay in plain coordinates.

Step control. Besides the error estimate, ETD2 caps each step at h <= 1.5/rho, with rho =
||R(u) - R(y)|| / ||u - y|| measured along the step it just took (free: both R values are at hand).
The explicit part is Heun's method, stable for real h*mu in [-2, 0]; without the cap a loose rtol lets
the steps hover at that limit, accepting an error of the size of the tolerance at every step, and
||grad L|| stalls (6e-5 at rtol 1e-3 on the tests' (3, 3, 4) problem; with the cap it reaches 1e-11
in 393 evaluations). With the cap, rtol sets the accuracy of the path only: the end point is the
flow's fixed point at any rtol.

Measured (``benchmarks/bench_flow.py``, one thread, to a loss 1e-6 above the closed form, lam = 5e-4):
at (C, N, p) = (10, 100, 64) GD at its largest stable step takes 8183 gradients; ETD2 339, 432, 770 at
rtol 1e-2, 1e-3, 1e-4; BDF 1585 at rtol 1e-5. At (100, 50, 256): GD 7791; ETD2 69, 148, 430; BDF 444.
Late in the run ETD2's steps average 104-107 time units at the smaller size (rtol 1e-3 and 1e-4), near
the stability limit 2/0.0195 = 103 of its explicit part.

Limits: ETD2 is only second order, so a path wanted to rtol < 1e-7 takes far more steps than DOP853.

Deep ReLU variants: the field is discontinuous where a hidden pre-activation crosses 0, and gradient
flow can slide along such a kink; adaptive steps then shrink to ~1e-4 (about 1e4 gradient evaluations
per unit of time at (C, N, p) = (3, 2, 4)). Integrate them over short horizons, or use GD/SGD.

Faults: a gradient that overflows or turns NaN stops the integration with ``success=False`` and a
message naming the cause and the last good time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.integrate import solve_ivp

from ._validation import check_choice, check_nonneg, check_positive_int
from .geometry import mean_cosine
from .model import UFMParams, UFMProblem, check_params, loss_and_grad, outputs, torch_loss

# Integrator name -> kind. "scipy-explicit"/"scipy-implicit" go through solve_ivp; "exponential" is ETD2.
METHODS: dict[str, str] = {
    "RK23": "scipy-explicit",
    "RK45": "scipy-explicit",
    "DOP853": "scipy-explicit",
    "BDF": "scipy-implicit",
    "Radau": "scipy-implicit",
    "LSODA": "scipy-implicit",
    "ETD2": "exponential",
}

# LSODA takes only a dense Jacobian: 4000 parameters is a 128 MB matrix, beyond that refuse.
DENSE_JAC_MAX = 4000
# ETD2 step-size control (Hairer, Norsett and Wanner I, II.4): safety factor and growth/shrink limits.
_SAFETY, _GROW_MAX, _SHRINK_MIN = 0.9, 5.0, 0.2
# Below |z| = 0.02 the phi-functions lose digits to cancellation; their Taylor series to z^4 is exact
# there to ~1e-12 relative (next term z^5/720).
_PHI_SERIES = 0.02
# A step shorter than this fraction of t is rounding noise: the integration is stuck.
_MIN_REL_STEP = 1e-13
# ETD2RK's explicit part is Heun's method, stable for real h*mu in [-2, 0]. Steps are capped at
# h <= _STABILITY_CAP / rho, rho the remainder's Lipschitz estimate along the last step (``_run_etd2``).
_STABILITY_CAP = 1.5
_TINY = 1e-300

STATUS_MESSAGES = {
    -1: "diverged",
    0: "reached t_max",
    1: "stationary: ||grad L|| < tol",
    2: "reached the target loss",
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
    params : final state.
    grad_norm : ||grad L|| at the final state.
    nfev : number of gradient evaluations (of the vector field).
    success : False only if the integration failed (status -1).
    status : -1 diverged or stuck, 0 reached t_max, 1 stationary, 2 reached the target loss.
    message : what happened, with the cause and the last good time on failure.
    method : the integrator.
    sol : dense output ``sol(t) -> (n_params,)`` of the flat state (``UFMParams.ravel`` order, or the
        flow's own state), or None unless requested.
    """

    t: np.ndarray
    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    params: UFMParams
    grad_norm: float
    nfev: int
    success: bool
    status: int
    message: str
    method: str
    sol: Callable[[float], np.ndarray] | None = field(default=None, repr=False)

    @property
    def t_final(self) -> float:
        return float(self.t[-1])


class FlowDiverged(ArithmeticError):
    """The vector field overflowed or turned NaN; carries the cause and the last good time."""

    def __init__(self, cause: str, t_good: float):
        super().__init__(f"diverged: {cause}; last good time t = {t_good:.6g}")
        self.cause, self.t_good = cause, t_good


@dataclass
class _System:
    """A flow on a flat state y: the vector field and how to read the state as UFM parameters.

    ``field(y) -> (loss, dy/dt, stationarity)`` in NumPy; ``stationarity`` is the norm the event
    compares with ``tol`` (||grad L|| for gradient flow). ``linear`` is the diagonal Lambda of the
    module docstring. ``torch_field`` (optional) is the same triple on torch tensors of any device.
    ``extra(y)`` adds flow-specific scalars to the record. ``to_flat(y)`` (optional) maps the state to
    ``UFMParams.ravel`` order when the state is in other coordinates, so that dense output is in it.
    ``stationarity_is_grad_norm`` lets the records reuse the stationarity as ||grad L||.
    """

    problem: UFMProblem
    y0: np.ndarray
    field: Callable[[np.ndarray], tuple[float, np.ndarray, float]]
    to_params: Callable[[np.ndarray], UFMParams]
    linear: np.ndarray
    torch_field: Callable[[Any], tuple[Any, Any, Any]] | None = None
    extra: Callable[[np.ndarray], dict[str, float]] | None = None
    to_flat: Callable[[np.ndarray], np.ndarray] | None = None
    stationarity_is_grad_norm: bool = True


def _checked(cause_of: str, value: float, arrays: Sequence[np.ndarray], t_good: float) -> None:
    """Raise FlowDiverged if ``value`` or an array is not finite."""
    if not np.isfinite(value):
        raise FlowDiverged(f"{cause_of} is {value} (overflow or NaN)", t_good)
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise FlowDiverged(f"{cause_of}: non-finite gradient entries (overflow or NaN)", t_good)


def linear_part(problem: UFMProblem, like: UFMParams) -> np.ndarray:
    """Diagonal Lambda (flat, ``ravel`` order) of the exact split -grad L = Lambda theta + R(theta).

    Weight decays on H and on each W_k, and on b: 1 + lam_b for the square loss (the bias block of
    its Hessian is exactly (1 + lam_b) I), lam_b for cross-entropy.
    """
    parts = [np.full(like.H.size, problem.lam_h)]
    parts += [np.full(Wk.size, lam) for lam, Wk in zip(problem.lam_layers, like.Ws)]
    if like.b is not None:
        parts.append(np.full(like.b.size, problem.lam_b + (1.0 if problem.loss == "mse" else 0.0)))
    return -np.concatenate(parts)


class _FlatCoordinates:
    """The flat parameter vector itself (``UFMParams.ravel`` order) as the state."""

    @staticmethod
    def to_state(theta: Any) -> Any:
        return theta

    @staticmethod
    def to_flat(y: Any) -> Any:
        return y

    @staticmethod
    def velocity(theta: Any, dtheta: Any) -> Any:
        return dtheta


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

    def _mean_output_shift(self, y: Any) -> Any:
        """W mu_G (C,), the same in both coordinates (H and W are shared)."""
        H, W = self._H_W(y)
        return W @ H.sum(1) / self.n

    def to_state(self, theta: Any) -> Any:
        y = theta + 0
        y[-self.C :] = theta[-self.C :] + self._mean_output_shift(theta)
        return y

    def to_flat(self, y: Any) -> Any:
        theta = y + 0
        theta[-self.C :] = y[-self.C :] - self._mean_output_shift(y)
        return theta

    def velocity(self, theta: Any, dtheta: Any) -> Any:
        """dy/dt from d theta/dt: dm/dt = dW/dt mu_G + W dmu_G/dt + db/dt (the chain rule)."""
        H, W = self._H_W(theta)
        dH, dW = self._H_W(dtheta)
        dy = dtheta + 0
        dy[-self.C :] = dtheta[-self.C :] + (dW @ H.sum(1) + W @ dH.sum(1)) / self.n
        return dy


def _coordinates(problem: UFMProblem, like: UFMParams) -> _FlatCoordinates | _MeanOutputCoordinates:
    """Mean-output coordinates where they remove the stiff bias coupling (depth 1, square loss, bias)."""
    if problem.depth == 1 and problem.loss == "mse" and like.b is not None:
        return _MeanOutputCoordinates(like)
    return _FlatCoordinates()


def _gradient_system(problem: UFMProblem, start: UFMParams) -> _System:
    coords = _coordinates(problem, start)

    def field_np(y: np.ndarray) -> tuple[float, np.ndarray, float]:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            theta = coords.to_flat(y)
            value, grad = loss_and_grad(problem, UFMParams.unravel(start, theta))
            g = grad.ravel()
            return value, coords.velocity(theta, -g), float(np.linalg.norm(g))

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
        to_params=lambda y: UFMParams.unravel(start, coords.to_flat(np.array(y, dtype=float))),
        linear=linear_part(problem, start),
        torch_field=field_torch,
        to_flat=None if isinstance(coords, _FlatCoordinates) else coords.to_flat,
    )


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


def record_state(problem: UFMProblem, params: UFMParams) -> dict[str, float]:
    """Loss, eps, cos_w and the scalar NC measures of ``ufm.metrics.nc_metrics`` at one state.

    ``eps`` is 1 minus the mean correct-class output (THEORY.md 4). Measures that ``nc_metrics``
    cannot define at this state (coinciding class means) are NaN.
    """
    from .metrics import nc_metrics
    from .model import last_features, loss

    f = outputs(problem, params)  # (C, n)
    labels = problem.labels
    rec = {
        "loss": loss(problem, params),
        "eps": 1.0 - float(np.mean(f[labels, np.arange(problem.n)])),
        "cos_w": mean_cosine(params.W),
        "norm_w_sq": float(np.sum(params.W**2)),
        "norm_h_sq": float(np.sum(params.H**2)),
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
    """tqdm bar over flow time on stderr; a no-op when disabled."""

    def __init__(self, t_max: float, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=float(t_max), desc=desc, unit="t", file=sys.stderr, leave=False)
        self.t = 0.0

    def update(self, t: float) -> None:
        if self.bar is not None and t > self.t:
            self.bar.update(t - self.t)
            self.t = t

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def gradient_flow(
    problem: UFMProblem,
    start: UFMParams,
    *,
    method: str = "DOP853",
    t_max: float = 1e6,
    tol: float = 1e-8,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    t_eval: Sequence[float] | np.ndarray | None = None,
    n_records: int = 60,
    metrics: bool = True,
    target_loss: float | None = None,
    dense_output: bool = False,
    progress: bool = False,
    device: str = "cpu",
) -> FlowResult:
    """Integrate d theta/dt = -grad L(theta) from ``start`` until ||grad L|| < tol or t = t_max.

    Parameters
    ----------
    problem : the model (any depth, bias, loss).
    start : initial parameters theta(0) (H (p, n), W_k, b).
    method : a name in ``METHODS`` (module docstring for the choice). ``ETD2`` at rtol 1e-3 to 1e-4 is the
        fastest way to the limit (and the GPU route); DOP853 or BDF when the path is wanted to rtol < 1e-7.
    t_max : final time if the flow is not stationary before.
    tol : stationarity threshold on ||grad L||_2 (terminal event, checked on accepted steps).
    rtol, atol : local error tolerances of the integrator.
    t_eval : times at which loss and measures are recorded (default: 0 and ``n_records - 1``
        log-spaced times up to t_max); the final time is always recorded.
    metrics : record the NC measures (else loss and grad_norm only).
    target_loss : also stop (status 2) once the loss is <= this value.
    dense_output : keep a dense interpolant ``sol`` of the flat state.
    progress : show a tqdm bar over t on stderr.
    device : torch device for ``ETD2`` ("cpu" uses the analytic NumPy gradient, others torch autograd).

    Returns
    -------
    FlowResult
    """
    check_params(problem, start)
    return _integrate(
        _gradient_system(problem, start), method=method, t_max=t_max, tol=tol, rtol=rtol, atol=atol,
        t_eval=t_eval, n_records=n_records, metrics=metrics, target_loss=target_loss,
        dense_output=dense_output, progress=progress, device=device,
    )  # fmt: skip


def _then(first: Callable[[float], np.ndarray], second: Callable[[np.ndarray], np.ndarray]):
    """t -> second(first(t)): dense output of the state, read in other coordinates."""
    return lambda t: second(first(t))


def _integrate(
    system: _System,
    *,
    method: str,
    t_max: float,
    tol: float,
    rtol: float,
    atol: float,
    t_eval: Sequence[float] | np.ndarray | None,
    n_records: int,
    metrics: bool,
    target_loss: float | None,
    dense_output: bool,
    progress: bool,
    device: str,
) -> FlowResult:
    """Shared driver: validate, integrate with the chosen method, record, and package a FlowResult."""
    check_choice("method", method, METHODS)
    t_max = check_nonneg("t_max", t_max)
    check_nonneg("tol", tol)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    if t_eval is None:
        t_eval = _default_t_eval(t_max, check_positive_int("n_records", n_records))
    t_eval = np.asarray(t_eval, dtype=float)
    if (
        t_eval.ndim != 1
        or np.any(np.diff(t_eval) <= 0)
        or (t_eval.size and (t_eval[0] < 0 or t_eval[-1] > t_max))
    ):
        raise ValueError("t_eval must be increasing times in [0, t_max]")
    if not t_eval.size or t_eval[-1] < t_max:
        t_eval = np.append(t_eval, t_max)

    try:
        value0, dy0, stat0 = system.field(system.y0)
    except FloatingPointError as err:
        raise ValueError(f"the start: its loss or gradient overflows ({err}); scale it down") from None
    _checked("the start", value0, [dy0], 0.0)
    if t_max == 0 or stat0 < tol or (target_loss is not None and value0 <= target_loss):
        status = 0 if t_max == 0 else (1 if stat0 < tol else 2)
        ts, ys, sol, nfev, msg = np.array([0.0]), [system.y0], None, 1, STATUS_MESSAGES[status] + " at t = 0"
    else:
        bar = _Progress(t_max, progress, f"flow {method}")
        try:
            run = _run_scipy if METHODS[method].startswith("scipy") else _run_etd2
            ts, ys, sol, nfev, status, msg = run(
                system, method, t_max, tol, rtol, atol, t_eval, target_loss, dense_output, bar, device
            )
        finally:
            bar.close()
        nfev += 1  # the check at the start
        if sol is not None and system.to_flat is not None:
            sol = _then(sol, system.to_flat)
    records = []
    for y in ys:
        params = system.to_params(y)
        value, _, stat = system.field(np.asarray(y, dtype=float))
        rec = record_state(system.problem, params) if metrics else {"loss": value}
        rec["grad_norm"] = (
            stat
            if system.stationarity_is_grad_norm
            else float(np.linalg.norm(loss_and_grad(system.problem, params)[1].ravel()))
        )
        rec["stationarity"] = stat
        if system.extra is not None:
            rec.update(system.extra(np.asarray(y, dtype=float)))
        records.append(rec)
    stacked = _stack_records(records)
    loss_t = stacked.pop("loss")
    final = system.to_params(ys[-1])
    return FlowResult(
        t=np.asarray(ts, dtype=float), loss=loss_t, metrics=stacked, params=final,
        grad_norm=float(stacked["grad_norm"][-1]), nfev=int(nfev), success=status >= 0, status=status,
        message=msg, method=method, sol=sol,
    )  # fmt: skip


def _run_scipy(system, method, t_max, tol, rtol, atol, t_eval, target_loss, dense_output, bar, device):
    """solve_ivp with a terminal stationarity event (and a target-loss event); counts evaluations."""
    n = system.y0.size
    state = {"nfev": 0, "t_good": 0.0, "y": None, "out": None}

    def evaluate(y: np.ndarray) -> tuple[float, np.ndarray, float]:
        # FSAL methods evaluate the field at the accepted point just before the events: reuse it.
        if state["y"] is not None and np.array_equal(state["y"], y):
            return state["out"]
        try:
            out = system.field(y)
        except FloatingPointError as err:
            raise FlowDiverged(f"floating-point {err}", state["t_good"]) from None
        _checked("the loss", out[0], [out[1]], state["t_good"])
        state["nfev"] += 1
        state["y"], state["out"] = y.copy(), out
        return out

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        return evaluate(y)[1]

    def stationary(t: float, y: np.ndarray) -> float:
        # Events are evaluated on accepted steps (and inside their root search): t is good so far.
        state["t_good"] = max(state["t_good"], t)
        bar.update(t)
        return evaluate(y)[2] - tol

    stationary.terminal, stationary.direction = True, -1
    events = [stationary]
    if target_loss is not None:

        def reached(t: float, y: np.ndarray) -> float:
            return evaluate(y)[0] - target_loss

        reached.terminal, reached.direction = True, -1
        events.append(reached)

    kw: dict[str, Any] = {}
    if METHODS[method] == "scipy-implicit":
        if method == "LSODA":
            if n > DENSE_JAC_MAX:
                raise ValueError(
                    f"LSODA needs a dense Jacobian; {n} parameters exceed DENSE_JAC_MAX = {DENSE_JAC_MAX}: "
                    "use BDF or Radau (sparse approximate Jacobian), DOP853 or ETD2"
                )
            dense = np.diag(system.linear)
            kw["jac"] = lambda t, y: dense
        else:
            kw["jac"] = sparse.diags(system.linear, format="csc")
    try:
        r = solve_ivp(
            fun, (0.0, t_max), system.y0, method=method, t_eval=t_eval, events=events, rtol=rtol, atol=atol,
            dense_output=dense_output, **kw,
        )  # fmt: skip
    except FlowDiverged as err:
        return np.array([state["t_good"]]), [state["y"]], None, state["nfev"], -1, str(err)
    ts, ys = list(r.t), [r.y[:, j] for j in range(r.y.shape[1])]
    if r.status == 1:  # an event fired: which one, and where
        k = 0 if r.t_events[0].size else 1
        t_end, y_end = float(r.t_events[k][0]), r.y_events[k][0]
        status = 1 if k == 0 else 2
        if not ts or ts[-1] < t_end:
            ts.append(t_end)
            ys.append(y_end)
    elif r.status == 0:
        status = 0
    else:
        return (
            np.array([state["t_good"]]),
            [state["y"]],
            None,
            state["nfev"],
            -1,
            f"{method} failed: {r.message}",
        )
    msg = f"{STATUS_MESSAGES[status]} at t = {ts[-1]:.6g}"
    return np.array(ts), ys, r.sol, state["nfev"], status, msg


def _phi12(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi_1(z) = (e^z - 1)/z and phi_2(z) = (e^z - 1 - z)/z^2 elementwise, by series near 0."""
    small = np.abs(z) < _PHI_SERIES
    zs = np.where(small, 1.0, z)  # avoid 0/0 in the branch not taken
    em1 = np.expm1(zs)
    phi1 = np.where(small, 1 + z / 2 + z**2 / 6 + z**3 / 24 + z**4 / 120, em1 / zs)
    phi2 = np.where(small, 0.5 + z / 6 + z**2 / 24 + z**3 / 120 + z**4 / 720, (em1 - zs) / zs**2)
    return phi1, phi2


def _hermite(t0, y0, f0, t1, y1, f1, t):
    """Cubic Hermite interpolation between (t0, y0, y0') and (t1, y1, y1') at t (third order, as ETD2)."""
    h = t1 - t0
    s = (t - t0) / h
    h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * y0 + h10 * h * f0 + h01 * y1 + h11 * h * f1


class _PiecewiseHermite:
    """Dense output of ETD2: cubic Hermite on each accepted step (NumPy, on the host)."""

    def __init__(self, ts: list[float], ys: list[np.ndarray], fs: list[np.ndarray]):
        self.ts, self.ys, self.fs = np.array(ts), ys, fs

    def __call__(self, t: float) -> np.ndarray:
        i = int(np.clip(np.searchsorted(self.ts, t, side="right") - 1, 0, len(self.ts) - 2))
        return _hermite(self.ts[i], self.ys[i], self.fs[i], self.ts[i + 1], self.ys[i + 1], self.fs[i + 1], t)


def _blocks(linear: np.ndarray) -> tuple[list[slice], np.ndarray]:
    """The runs of equal entries of the diagonal Lambda: (slices, their values). Lambda is constant
    on each parameter block, so a handful of runs cover the state."""
    cuts = [0, *(np.flatnonzero(np.diff(linear)) + 1).tolist(), linear.size]
    return [slice(i, j) for i, j in zip(cuts[:-1], cuts[1:])], linear[cuts[:-1]]


def _run_etd2(system, method, t_max, tol, rtol, atol, t_eval, target_loss, dense_output, bar, device):
    """Adaptive ETD2RK (module docstring): y' = Lambda y + R(y), Lambda diagonal, in NumPy or torch.

    With u - y = h phi_1(h Lambda) f(y), the two stages read (Cox and Matthews 2002, eq. 22)
        u     = y + h phi_1 f(y)                                        (exponential Euler)
        y_new = u + h phi_2 (f(u) - f(y)) - h^2 phi_2 phi_1 Lambda f(y)  (ETD2RK),
    so the phi-functions are needed only as one scalar per run of Lambda (``_blocks``).
    """
    runs, levels = _blocks(system.linear)
    if device == "cpu":  # NumPy on the host: no tensor round trips around the analytic gradient
        xp, host, field = np, np.asarray, system.field
        y = system.y0.copy()
    else:
        import torch

        if system.torch_field is None:
            raise ValueError(f"this flow has no torch vector field; use device='cpu', not {device!r}")
        xp, field = torch, system.torch_field
        y = torch.as_tensor(system.y0, dtype=torch.float64, device=torch.device(device)).clone()

        def host(a):
            return a.detach().cpu().numpy()

    def rms(a) -> float:
        return float((a**2).mean()) ** 0.5

    t, nfev = 0.0, 0
    ts_out, ys_out = [], []
    dense_t, dense_y, dense_f = [], [], []
    rec_i = 0
    prev = None  # (t, y, f) of the previous accepted point, for Hermite recording
    h = None
    status, msg = 0, ""
    while True:
        try:
            value, f, stationarity = field(y)
        except FloatingPointError as err:
            status, msg = -1, str(FlowDiverged(f"floating-point {err}", t))
            break
        nfev += 1
        stationarity = float(stationarity)
        if not (np.isfinite(float(value)) and np.isfinite(stationarity)):
            t_good = prev[0] if prev is not None else 0.0
            status, msg = -1, str(FlowDiverged("non-finite loss or gradient (overflow or NaN)", t_good))
            break
        # Record the requested times in (t_prev, t] by Hermite interpolation over the last step.
        while rec_i < t_eval.size and t_eval[rec_i] <= t:
            te = float(t_eval[rec_i])
            ye = y if prev is None or te == t else _hermite(prev[0], prev[1], prev[2], t, y, f, te)
            ts_out.append(te)
            ys_out.append(np.array(host(ye)))
            rec_i += 1
        if dense_output:
            dense_t.append(t)
            dense_y.append(np.array(host(y)))
            dense_f.append(np.array(host(f)))
        if stationarity < tol:
            status = 1
            break
        if target_loss is not None and float(value) <= target_loss:
            status = 2
            break
        if t >= t_max:
            status = 0
            break
        bar.update(t)
        if h is None:  # Hairer's starting step (Hairer, Norsett and Wanner I, II.4)
            scale_y = atol + rtol * xp.abs(y)
            d0, d1 = rms(y / scale_y), rms(f / scale_y)
            h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        while True:
            h = min(h, t_max - t)
            phi1, phi2 = _phi12(h * levels)
            u = y + 0
            for run, c in zip(runs, h * phi1):
                u[run] += c * f[run]
            try:
                _, fu, _ = field(u)
                nfev += 1
                df = fu - f
                corr = df + 0
                for run, c, d in zip(runs, h * phi2, h * h * phi2 * phi1 * levels):
                    corr[run] *= c
                    corr[run] -= d * f[run]
                y_new = u + corr
                err = rms(corr / (atol + rtol * xp.maximum(xp.abs(y), xp.abs(y_new))))
            except FloatingPointError:
                err = float("inf")
            if np.isfinite(err) and err <= 1.0:
                break
            # A non-finite trial stage is treated as a failed step: shrink and retry.
            h *= _SHRINK_MIN if not np.isfinite(err) else max(_SHRINK_MIN, _SAFETY * err**-0.5)
            if h < _MIN_REL_STEP * max(t, 1.0):
                status = -1
                msg = str(FlowDiverged(f"step size underflow (h = {h:.3g}) in ETD2", t))
                break
        if status == -1:
            break
        # rho = ||R(u) - R(y)|| / ||u - y|| on the accepted step, with u - y = h phi_1 f(y) per run: free,
        # and it grows to the stiffest mode's rate as soon as that mode starts to grow (Shampine's
        # stiffness detection; Hairer and Wanner II, IV.2).
        sq_rest = sq_step = 0.0
        for run, c, lam in zip(runs, h * phi1, levels):
            step = c * f[run]
            sq_step += float((step**2).sum())
            sq_rest += float(((df[run] - lam * step) ** 2).sum())
        rho = (sq_rest / max(sq_step, _TINY)) ** 0.5
        prev = (t, y, f)
        t = t_max if t + h >= t_max * (1 - 1e-15) else t + h
        y = y_new
        h *= min(_GROW_MAX, _SAFETY * max(err, 1e-10) ** -0.5)
        # Without the cap, a loose rtol lets steps hover at the stability limit, accepting errors of
        # the size of the tolerance at every step, and ||grad L|| stalls (measured: 6e-5 at rtol 1e-3).
        h = min(h, _STABILITY_CAP / max(rho, _TINY))
    if status == -1:
        good = prev[1] if prev is not None else y
        t_good = prev[0] if prev is not None else 0.0
        return np.array([t_good]), [np.array(host(good))], None, nfev, -1, msg
    if not ts_out or ts_out[-1] < t:
        ts_out.append(t)
        ys_out.append(np.array(host(y)))
    sol = _PiecewiseHermite(dense_t, dense_y, dense_f) if dense_output and len(dense_t) > 1 else None
    return np.array(ts_out), ys_out, sol, nfev, status, f"{STATUS_MESSAGES[status]} at t = {t:.6g}"
