"""Numerical minimization of the UFM loss, the independent check of the closed forms.

L-BFGS (``scipy.optimize.minimize``) on the exact gradient of ``ufm.model``, from several random
starts; the best end point is kept. The depth-1 square-loss UFM with an unregularized bias or none
has no spurious local minima (its critical points other than the global minima are strict saddles),
so a few starts suffice there. Other models have them (deep linear layers, a regularized bias in a
small dimension, cross-entropy at depth 3: docs/theory.md §13.7), so every start's end point is
classified (``ufm.critical.classify_point``) and the result reports the spread of the end losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from ._threads import scipy_blas_on_one_thread
from ._validation import check_memory, check_positive_int
from .critical import CriticalPoint, classify_point
from .model import UFMParams, UFMProblem, check_params, loss, loss_and_grad, loss_and_grad_norm

# L-BFGS stops on a relative decrease below FTOL or a projected gradient below GTOL. These are far
# below the 1e-8 relative loss agreement we claim, so the closed form is tested, not the stopping rule.
FTOL = 1e-15
GTOL = 1e-11
MAXITER = 20_000
MAXCOR = 30  # L-BFGS-B's stored corrections
# End losses of two starts within DISTINCT_RTOL (relative, floor 1e-12) count as one: L-BFGS at the
# tolerances above ends within ~1e-14 of the critical point it converges to, and distinct local
# minima of the models in docs/theory.md §13.7 differ by 1e-3 or more.
DISTINCT_RTOL = 1e-8


@dataclass(frozen=True)
class MinimizeResult:
    """Best of several L-BFGS runs.

    Attributes
    ----------
    params : the best end point.
    loss : its loss.
    losses : (n_starts,) end loss of each start.
    grad_norm : ||grad L|| at ``params``.
    nfev : loss-and-gradient evaluations over all starts.
    success : whether the best run met its tolerance.
    message : the optimizer's message for the best run.
    ends : (n_starts,) the classification of each start's end point (geometry, Hessian, kind;
        ``ufm.critical.CriticalPoint``), in the order of ``losses``.
    """

    params: UFMParams
    loss: float
    losses: np.ndarray
    grad_norm: float
    nfev: int
    success: bool
    message: str
    ends: tuple[CriticalPoint, ...] = ()

    @property
    def critical(self) -> CriticalPoint:
        """The classification of the best end point."""
        return self.ends[int(np.argmin(self.losses))]

    @property
    def loss_worst(self) -> float:
        """The highest end loss over the starts."""
        return float(np.max(self.losses))

    @property
    def n_distinct(self) -> int:
        """How many distinct end losses the starts reached (to DISTINCT_RTOL)."""
        ordered = np.sort(self.losses)
        gaps = np.diff(ordered) > DISTINCT_RTOL * np.maximum(np.abs(ordered[1:]), 1e-12)
        return 1 + int(gaps.sum())

    def spread(self) -> dict[str, float | int]:
        """best and worst end loss, and the number of distinct end losses, as a plain dict."""
        return {"best": self.loss, "worst": self.loss_worst, "n_distinct": self.n_distinct}


def _check_lbfgs_memory(problem: UFMProblem, p: int, n_starts: int) -> None:
    """Refuse, before allocating, an L-BFGS run that cannot fit. Its peak is estimated as 2 MAXCOR + 10
    + n_starts vectors of the parameters' size: L-BFGS-B's workspace (its ``wa`` array, 2 m n + 5 n +
    11 m^2 + 8 m floats for m corrections), some 5 more for the point, the gradient and its
    temporaries, and the starts, made up front."""
    size = check_positive_int("p", p) * problem.n + (problem.depth - 1) * p * p + problem.C * p + problem.C
    check_memory(
        f"L-BFGS at C = {problem.C}, n = {problem.n}, p = {p}, depth {problem.depth}",
        8.0 * size * (2 * MAXCOR + 10 + n_starts),
        "choose a smaller p (or fewer classes or examples); the closed form itself needs no L-BFGS",
    )


def minimize_loss(
    problem: UFMProblem,
    p: int,
    *,
    n_starts: int = 4,
    seed: int = 0,
    init_scale: float = 1.0,
    start: UFMParams | None = None,
    classify: bool = True,
) -> MinimizeResult:
    """Minimize the regularized loss of ``problem`` in feature dimension p by L-BFGS.

    Parameters
    ----------
    problem : the model; p : feature dimension; n_starts : random starts (seeded by ``seed``);
    init_scale : scale of ``UFMParams.random``; start : an explicit first start (then n_starts - 1 random);
    classify : classify every end point (``ufm.critical.classify_point``, with its Hessian up to
        ``HESSIAN_MAX_PARAMS`` parameters); False leaves ``ends`` empty.
    """
    n_starts = check_positive_int("n_starts", n_starts)
    _check_lbfgs_memory(problem, p, n_starts)
    rng = np.random.default_rng(seed)
    starts = [start] if start is not None else []
    starts += [UFMParams.random(problem, p, scale=init_scale, rng=rng) for _ in range(n_starts - len(starts))]
    runs, nfev = [], 0
    for x0 in starts:
        check_params(problem, x0)

        def fun(theta: np.ndarray, like: UFMParams = x0) -> tuple[float, np.ndarray]:
            value, grad = loss_and_grad(problem, UFMParams.unravel(like, theta))
            return value, grad.ravel()

        with scipy_blas_on_one_thread():  # L-BFGS-B's vector work beside NumPy's gradients
            res = minimize(
                fun, x0.ravel(), jac=True, method="L-BFGS-B",
                options={"ftol": FTOL, "gtol": GTOL, "maxiter": MAXITER, "maxfun": 2 * MAXITER, "maxcor": MAXCOR},
            )  # fmt: skip
        nfev += res.nfev
        runs.append((res.fun, res, x0))
    losses = np.array([r[0] for r in runs])
    ends = (
        tuple(classify_point(problem, UFMParams.unravel(x0, res.x)) for _, res, x0 in runs)
        if classify
        else ()
    )
    best_loss, best, like = runs[int(np.argmin(losses))]
    params = UFMParams.unravel(like, best.x)
    grad_norm = loss_and_grad_norm(problem, params)[1]
    return MinimizeResult(
        params, float(best_loss), losses, grad_norm, nfev, bool(best.success), str(best.message), ends
    )


@dataclass(frozen=True)
class OptimumCheck:
    """The closed-form optimum set against numerical minimization.

    Attributes
    ----------
    closed_form : the closed-form optimum (``Loss.closed_form``).
    loss_built : the model's loss at ``closed_form.build(p)`` (checks the formula for the loss
        against the formulas for the minimizer); None where the infimum is not attained.
    numeric : the best L-BFGS result from random starts.
    rel_gap : (numeric.loss - closed_form.loss) / closed_form.loss; negative would refute the claim.
    """

    closed_form: Any  # UFMOptimum, DeepOptimum or CEOptimum
    loss_built: float | None
    numeric: MinimizeResult

    @property
    def rel_gap(self) -> float:
        """Relative gap in the loss; the absolute gap when the minimal loss is 0 (lam_w lam_h = 0)."""
        gap = self.numeric.loss - self.closed_form.loss
        return gap / self.closed_form.loss if self.closed_form.loss != 0 else gap


def verify_optimum(problem: UFMProblem, p: int, *, n_starts: int = 4, seed: int = 0) -> OptimumCheck:
    """Compare ``problem.loss.closed_form(problem)`` (any model that has one) with ``minimize_loss``
    from ``n_starts`` random starts in dimension p. Deep models have spurious local minima, so a
    single start may end above the closed form; the best start is compared."""
    opt = problem.loss.closed_form(problem)
    if p < opt.min_dim:
        raise ValueError(f"p = {p} is below the minimizer's dimension {opt.min_dim} ({opt.geometry})")
    _check_lbfgs_memory(problem, p, n_starts)  # before the minimizer is built in dimension p
    built = loss(problem, opt.build(p, rng=seed)) if opt.attained else None
    return OptimumCheck(opt, built, minimize_loss(problem, p, n_starts=n_starts, seed=seed))


def check_optimum(
    C: int, N: int, p: int, lam_w: float, lam_h: float, *, bias: bool = True, label_smoothing: float = 0.0,
    n_starts: int = 4, seed: int = 0, lam_b: float = 0.0,
) -> OptimumCheck:  # fmt: skip
    """Compare the closed form with ``minimize_loss`` on the same square-loss UFM (depth 1)."""
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias, label_smoothing=label_smoothing, lam_b=lam_b)
    return verify_optimum(problem, p, n_starts=n_starts, seed=seed)
