"""Critical points of the UFM loss: where an end point is, and what kind of point it is (docs/theory.md §13.7).

A flow, a descent or L-BFGS ends somewhere; this module says what that end point is, for any
``UFMProblem`` (any loss, depth, activation, bias, lam_b, class counts):

* its **geometry**: the frame the classifier rows W (C, p) form, one of ``GEOMETRIES``: "zero" (the
  outputs carry no class: the class-mean outputs W_L mu_c all vanish), "simplex_etf",
  "orthogonal_frame", or "other" (with its rank);
* its **gradient norm** ||grad L|| (the exact gradient of ``ufm.model``);
* the **extreme Hessian eigenvalues**, from Hessian-vector products that torch autograd computes
  exactly (double backward of ``ufm.model.torch_loss``): by eigvalsh of the Hessian formed from them
  up to HESSIAN_DENSE_MAX parameters, else by Lanczos (``scipy.sparse.linalg.eigsh``);
* its **kind**, one of ``CRITICAL_POINTS``: "not_stationary", "minimum", "saddle", or "stationary"
  (stationary, Hessian not computed).

The regularized loss has continuous symmetries: rotations of the features H -> Q H, W_1 -> W_1 Q^T
and, for linear hidden layers, of each hidden layer (rescalings of hidden units leave the data term
alone but not the weight decay, so they are not flat when lam > 0). Each is a flat direction, so at
a minimum the Hessian has exact zero eigenvalues, and at a point that is stationary only to a
tolerance these come out as small numbers of either sign. "Minimum" therefore means a smallest
eigenvalue >= -HESSIAN_RTOL times the Hessian's largest |eigenvalue|: second-order stationary to a
scale-aware tolerance, which a strict saddle fails and a minimum with flat symmetry directions passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._threads import one_torch_thread
from .geometry import frame_distance
from .model import UFMParams, UFMProblem, check_params, last_features, loss_and_grad, torch_loss

__all__ = [
    "CRITICAL_POINTS", "CriticalPoint", "GEOMETRIES", "classify_point", "hessian_operator",
    "point_geometry",
]  # fmt: skip

GEOMETRIES = ("simplex_etf", "orthogonal_frame", "other", "zero")
CRITICAL_POINTS = ("minimum", "saddle", "stationary", "not_stationary")

# The tolerances, each relative to a scale of the problem (docs/theory.md §13.7).
#
# Frame distances (``ufm.geometry.frame_distance``) are relative to ||W||_F. A flow stopped at
# ||grad L|| < 1e-8 is within about 1e-8/lam of its fixed point, a distance of 1e-7 to 1e-5 at
# lam >= 1e-3 (measured 7e-8 on a depth-3 cross-entropy flow at lam = 1e-2); 1e-3 leaves room for
# looser stopping rules and still tells an ETF from the frames near it.
FRAME_TOL = 1e-3
# Rank of W: singular values above RANK_RTOL s_max(W). Directions the minimizer does not use decay
# like the frame distance above, so the cutoff is the same (not rounding level: the end point is
# stationary only to the stopping tolerance).
RANK_RTOL = 1e-3
# "zero": the class-mean outputs W_L mu_c (C, C) have norm <= ZERO_TOL, in units of the targets' gap
# 1. A nonzero square-loss minimizer has outputs of size 1 - delta, so only a point within 1e-6 of
# the collapse threshold would be mistaken for zero.
ZERO_TOL = 1e-6
# Stationary: ||grad L|| <= STATIONARY_TOL. The losses are O(1) (the zero solution costs
# (C-1)/(2C) <= 1/2 with the square loss, log C with cross-entropy), so this is also relative to the
# loss scale; the flows stop at 1e-8 by default and L-BFGS at ~1e-9, 1e-6 leaves room.
STATIONARY_TOL = 1e-6
# Minimum: lambda_min >= -HESSIAN_RTOL rho, rho the largest |eigenvalue| of the Hessian. The flat
# symmetry directions of a point stationary to ||grad L|| = g have Rayleigh quotients of order
# g / ||theta|| (docs/theory.md §13.7), far below this; the saddles of docs/theory.md §13.7 have
# lambda_min / rho = -0.018 (the regularized-bias ETF point) and -0.54 (the zero point).
HESSIAN_RTOL = 1e-6
# Lanczos: relative residual tolerance of eigsh (on a shifted operator, so it bounds the error of
# lambda_min by LANCZOS_TOL rho), Krylov dimension, and a budget of Hessian-vector products.
LANCZOS_TOL = 1e-10
LANCZOS_NCV = 40
HESSIAN_MAX_HVP = 20_000
# Up to this many parameters the Hessian is formed instead, one product per column, and its spectrum
# taken by eigvalsh: exact to rounding in a bounded n products, where Lanczos at a minimum's cluster of
# flat directions can spend thousands (docs/theory.md §13.7).
HESSIAN_DENSE_MAX = 500
# Above this many parameters the Hessian is skipped by default (``classify_point(hessian=None)``):
# each product costs about two gradients, and Lanczos may need thousands of them near a saddle.
HESSIAN_MAX_PARAMS = 50_000


@dataclass(frozen=True)
class CriticalPoint:
    """What an end point of the UFM is (module docstring; docs/theory.md §13.7).

    Attributes
    ----------
    geometry : one of GEOMETRIES, of the classifier rows W (C, p).
    rank : numerical rank of W (cutoff RANK_RTOL s_max); 0 for "zero".
    etf_distance, orth_distance : ``frame_distance`` of W from the simplex ETF and the orthogonal
        frame (relative to ||W||_F); None where the frame does not fit in R^p or W = 0.
    loss : L at the point; grad_norm : ||grad L||_2.
    hessian_min_eig : smallest Hessian eigenvalue (formed Hessian or Lanczos), or None when not computed.
    hessian_max_abs_eig : largest |eigenvalue| rho, the scale of the tolerance; None when not computed.
    hvp_count : Hessian-vector products spent.
    critical_point : one of CRITICAL_POINTS.
    note : why the Hessian was not computed, or "" .
    """

    geometry: str
    rank: int
    etf_distance: float | None
    orth_distance: float | None
    loss: float
    grad_norm: float
    hessian_min_eig: float | None
    hessian_max_abs_eig: float | None
    hvp_count: int
    critical_point: str
    note: str = ""

    @property
    def stationary(self) -> bool:
        return self.critical_point != "not_stationary"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_means(problem: UFMProblem, Z: np.ndarray) -> np.ndarray:
    """Class means of the columns of Z (p, n), as rows (C, p)."""
    counts = np.asarray(problem.counts)
    sums = np.zeros((problem.C, Z.shape[0]))
    np.add.at(sums, problem.labels, Z.T)
    return sums / counts[:, None]


def point_geometry(problem: UFMProblem, params: UFMParams) -> tuple[str, int, float | None, float | None]:
    """(geometry, rank, etf_distance, orth_distance) of the classifier rows W (C, p) (module docstring).

    "zero" when the class-mean outputs W_L mu_c (the bias left out) have norm <= ZERO_TOL; else
    "simplex_etf" or "orthogonal_frame" when W is within FRAME_TOL of one (rotation and scale free),
    else "other" with the rank of W at cutoff RANK_RTOL s_max.
    """
    W = params.W
    C, p = W.shape
    mean_outputs = _class_means(problem, last_features(problem, params)) @ W.T  # (C, C)
    s = np.linalg.svd(W, compute_uv=False)
    if np.linalg.norm(mean_outputs, 2) <= ZERO_TOL or s[0] == 0:
        return "zero", 0, None, None
    rank = int((s > RANK_RTOL * s[0]).sum())
    etf = frame_distance(W, "simplex_etf") if p >= C - 1 else None
    orth = frame_distance(W, "orthogonal_frame") if p >= C else None
    if etf is not None and etf <= FRAME_TOL:
        return "simplex_etf", rank, etf, orth
    if orth is not None and orth <= FRAME_TOL:
        return "orthogonal_frame", rank, etf, orth
    return "other", rank, etf, orth


def hessian_operator(problem: UFMProblem, params: UFMParams) -> Callable[[np.ndarray], np.ndarray]:
    """v -> (Hessian of L at ``params``) v, flat in ``UFMParams.ravel`` order, exact to rounding.

    Torch autograd in float64: the gradient graph of ``ufm.model.torch_loss`` is built once and each
    product is one more backward pass through it (double backward). ReLU layers contribute their
    a.e. second derivative 0 (the Hessian of the linear region the point lies in).
    """
    import torch

    sizes = [a.size for a in params.arrays()]
    shapes = [a.shape for a in params.arrays()]
    theta = torch.tensor(params.ravel(), dtype=torch.float64, requires_grad=True)
    parts = [x.view(s) for x, s in zip(torch.split(theta, sizes), shapes)]
    n_w = len(params.Ws)
    b = parts[1 + n_w] if params.b is not None else None
    value = torch_loss(problem, parts[0], parts[1 : 1 + n_w], b)
    (grad,) = torch.autograd.grad(value, theta, create_graph=True)

    def hvp(v: np.ndarray) -> np.ndarray:
        vt = torch.as_tensor(np.ascontiguousarray(v, dtype=float).reshape(-1))
        (hv,) = torch.autograd.grad(grad, theta, grad_outputs=vt, retain_graph=True)
        return hv.detach().numpy().copy()

    return hvp


def _dense_extremes(hvp: Callable[[np.ndarray], np.ndarray], n: int, count: list[int]) -> tuple[float, float]:
    """(lambda_min, rho = max |lambda|) of a symmetric n x n operator from its matrix, formed column by
    column (n products, counted in ``count[0]``) and symmetrized against rounding, by eigvalsh."""
    H = np.empty((n, n))
    unit = np.zeros(n)
    for i in range(n):
        unit[i] = 1.0
        H[:, i] = hvp(unit)
        unit[i] = 0.0
    count[0] += n
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    return float(eig[0]), float(max(-eig[0], eig[-1]))


def _lanczos_extremes(
    hvp: Callable[[np.ndarray], np.ndarray], n: int, count: list[int]
) -> tuple[float, float]:
    """(lambda_min, rho = max |lambda|) of a symmetric n x n operator by eigsh; ``count[0]`` counts
    the products.

    rho comes from ``which="LM"``; lambda_min from the largest eigenvalue rho - lambda_min of
    rho I - H, so that eigsh's relative tolerance bounds the error of lambda_min by LANCZOS_TOL rho
    instead of LANCZOS_TOL |lambda_min| (which stalls when lambda_min is a flat direction, ~0).
    A Ritz value never exceeds the largest eigenvalue, so an unconverged lambda_min errs upwards:
    ArpackNoConvergence is raised rather than a guess returned.
    """
    from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return hvp(v)

    H = LinearOperator((n, n), matvec=matvec, dtype=float)
    ncv = min(n, LANCZOS_NCV)
    maxiter = max(1, HESSIAN_MAX_HVP // ncv)
    v0 = np.random.default_rng(0).standard_normal(n)  # fixed start: the same answer every run
    opts = dict(k=1, tol=LANCZOS_TOL, ncv=ncv, maxiter=maxiter, v0=v0, return_eigenvectors=False)
    rho = float(abs(eigsh(H, which="LM", **opts)[0]))
    shifted = LinearOperator((n, n), matvec=lambda v: rho * v - matvec(v), dtype=float)
    try:
        top = float(eigsh(shifted, which="LA", **opts)[0])
    except ArpackError:
        # ARPACK stops when rho I - H sends the random start v0 to (numerically) zero. A generic
        # vector in the kernel means the kernel is everything: H = rho I (e.g. the zero solution of
        # a deep model, whose Hessian is the weight decay's), so lambda_min = rho.
        if np.linalg.norm(shifted.matvec(v0)) > 1e-10 * rho * np.linalg.norm(v0):
            raise
        top = 0.0
    return rho - top, rho


def classify_point(
    problem: UFMProblem,
    params: UFMParams,
    *,
    hessian: bool | None = None,
    grad_tol: float | None = None,
) -> CriticalPoint:
    """Geometry, gradient norm, extreme Hessian eigenvalues and kind of the point ``params``.

    Parameters
    ----------
    problem, params : any UFM problem and a point of it.
    hessian : compute the Hessian eigenvalues (True), skip them (False), or (None, the default)
        compute them when the problem has at most HESSIAN_MAX_PARAMS parameters.
    grad_tol : stationarity threshold on ||grad L|| (default STATIONARY_TOL).

    Returns
    -------
    CriticalPoint
        A ValueError where the loss or its gradient overflows. ``critical_point`` is "not_stationary" when ||grad L|| > grad_tol; otherwise "minimum" when
        lambda_min >= -HESSIAN_RTOL rho, "saddle" when below, and "stationary" when the Hessian was
        skipped or Lanczos did not converge within HESSIAN_MAX_HVP products (``note`` says which).
        The eigenvalues are reported whether or not the point is stationary.
    """
    from scipy.sparse.linalg import ArpackNoConvergence

    check_params(problem, params)
    grad_tol = STATIONARY_TOL if grad_tol is None else float(grad_tol)
    try:
        with np.errstate(over="raise", invalid="raise"):
            value, grad = loss_and_grad(problem, params)
            grad_norm = float(np.linalg.norm(grad.ravel()))
    except FloatingPointError as err:
        raise ValueError(
            f"the loss or its gradient overflows at this point ({err}): nothing to classify"
        ) from None
    geometry = point_geometry(problem, params)
    n = params.ravel().size
    want = n <= HESSIAN_MAX_PARAMS if hessian is None else bool(hessian)
    lam_min = rho = None
    count, note = [0], ""
    if not want:
        note = (
            f"Hessian skipped: {n} parameters > HESSIAN_MAX_PARAMS = {HESSIAN_MAX_PARAMS}"
            if hessian is None
            else "Hessian skipped (hessian=False)"
        )
    else:
        try:
            with one_torch_thread():
                extremes = _dense_extremes if n <= HESSIAN_DENSE_MAX else _lanczos_extremes
                lam_min, rho = extremes(hessian_operator(problem, params), n, count)
        except ArpackNoConvergence:
            note = f"Lanczos did not converge within {HESSIAN_MAX_HVP} Hessian-vector products"
    if grad_norm > grad_tol:
        kind = "not_stationary"
    elif lam_min is None:
        kind = "stationary"
    else:
        kind = "minimum" if lam_min >= -HESSIAN_RTOL * rho else "saddle"
    return CriticalPoint(
        *geometry, loss=float(value), grad_norm=grad_norm, hessian_min_eig=lam_min, hessian_max_abs_eig=rho,
        hvp_count=count[0], critical_point=kind, note=note,
    )  # fmt: skip
