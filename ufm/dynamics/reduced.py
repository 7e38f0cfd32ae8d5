"""Gradient flow of the square-loss UFM on the symmetric (collapsed) manifold: three scalar ODEs.

The manifold (depth 1, square loss): W = a F, H = m F[labels]^T, b = beta 1, with F (C, p) the unit
frame of the minimizer (simplex ETF with a bias, orthogonal frame without; ``ufm.geometry``).

Derivation. Let G = F F^T (C, C): with a bias G = C/(C-1) I - 1/(C-1) 11^T, without G = I. Every
example of class c has outputs f = u G e_c + beta 1 with u = a m, so (correct, wrong) outputs are
(u + beta, beta - u/(C-1)) with a bias and (u, 0) without, and

    L(a, m, beta) = 1/2 [(1 - u - beta)^2 + (C-1)(beta - u/(C-1))^2]          (with bias)
                  = 1/2 (1 - u)^2                                             (without)
                    + lam_w C a^2/2 + lam_h N C m^2/2 + lam_b C beta^2/2,

using ||F||_F^2 = C and ||F[labels]||_F^2 = N C. The full gradient is tangent to the manifold
(g H^T = (m/C)(s u - 1) F by F^T F F^T = s F^T, with s = C/(C-1) with a bias, 1 without, and
sum_c F_c = 0 for the ETF), so W' = a' F etc. and projecting with <., F> gives the reduced flow

    a'    = -(1/C)     dL/da    = -(m (s u - 1)/C + lam_w a)
    m'    = -(1/(N C)) dL/dm    = -(a (s u - 1)/(N C) + lam_h m)
    beta' = -(1/C)     dL/dbeta = -((1 + lam_b) beta - 1/C)      (with bias only)

since dL/du = s u - 1 and dL/dbeta = C beta - 1 + lam_b C beta (beta cancels from dL/du).
Fixed points with u != 0: (1 - s u)^2 = lam_w lam_h N C^2 = delta^2, so u = (1 - delta)/s and
a^2/m^2 = lam_h N/lam_w, i.e. a^2 = sqrt(lam_h N/lam_w)(1 - delta)/s, beta = 1/(C(1 + lam_b)), reached
from any start on the manifold with a m > 0 when delta < 1. With lam_b = 0 (or no bias) this is the
global minimizer of ``ufm.closed_form`` (k/C = 1/s). With lam_b > 0 it is the global minimizer only
when delta >= lam_b/(1 + lam_b); below that the bias saturates, the minimizer leaves this manifold
(its classifier rows gain a common mean component, docs/theory.md §6), and this fixed point is a
saddle of the full loss: for C=4, N=5, lam_w = lam_h = 0.02, lam_b = 1 it has loss 0.18466 against
the minimum 0.15889 (``ufm_optimum(..., lam_b=1)``).

Label smoothing a_s (docs/theory.md §14): with a bias the targets on the manifold become
(1 - a_s (C-1)/C, a_s/C), their mean 1/C is still the bias's, and dL/du = s u - (1 - a_s): the margin
1 - a_s replaces 1 (``Loss.reduced_margin``). Without a bias the smoothed mean a_s/C 11^T leaves the
orthogonal-frame manifold, so the reduction applies there only at a_s = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from .._validation import check_choice, check_nonneg
from ..geometry import orthogonal_frame, simplex_etf
from ..model import UFMParams, UFMProblem
from .integrators import METHODS, ScipyIntegrator


def _margin(problem: UFMProblem) -> float:
    """Target gap t_correct - t_wrong on the manifold (1 - a with label smoothing a); ValueError where
    the loss object says the manifold is not invariant."""
    margin = problem.loss.reduced_margin(problem.bias) if problem.depth == 1 else None
    if margin is None or not problem.balanced:
        raise ValueError(
            f"the reduced flow is derived for depth 1, balanced classes and a loss whose collapsed "
            f"manifold is invariant; got depth={problem.depth}, loss {problem.loss.description}, "
            f"bias={problem.bias}, counts {problem.counts}"
        )
    return margin


def _s(problem: UFMProblem) -> float:
    """Eigenvalue of G = F F^T on the targets: C/(C-1) with a bias (ETF), 1 without."""
    return problem.C / (problem.C - 1) if problem.bias else 1.0


def reduced_loss(problem: UFMProblem, a: float, m: float, beta: float = 0.0) -> float:
    """L(a, m, beta) of the module docstring: the full loss at W = a F, H = m F[labels]^T, b = beta 1.

    With label smoothing a_s the targets on the manifold are (1 - a_s (C-1)/C, a_s/C) instead of (1, 0).
    """
    _margin(problem)
    C, N, u = problem.C, problem.N, a * m
    t_wrong = problem.label_smoothing / C
    t_correct = t_wrong + _margin(problem)
    if problem.bias:
        data = 0.5 * ((t_correct - u - beta) ** 2 + (C - 1) * (t_wrong - beta + u / (C - 1)) ** 2)
        pen_b = 0.5 * problem.lam_b * C * beta**2
    else:
        data, pen_b = 0.5 * (1 - u) ** 2, 0.0
    return data + 0.5 * problem.lam_w[0] * C * a**2 + 0.5 * problem.lam_h * N * C * m**2 + pen_b


def reduced_field(problem: UFMProblem, state: np.ndarray) -> np.ndarray:
    """(a', m', beta') of the module docstring; ``state`` is (a, m, beta), or (a, m) without a bias."""
    _margin(problem)
    C, N = problem.C, problem.N
    a, m = state[0], state[1]
    du = _s(problem) * a * m - _margin(problem)  # dL/du
    da = -(m * du / C + problem.lam_w[0] * a)
    dm = -(a * du / (N * C) + problem.lam_h * m)
    if not problem.bias:
        return np.array([da, dm])
    return np.array([da, dm, -((1 + problem.lam_b) * state[2] - 1.0 / C)])


def manifold_frame(
    problem: UFMProblem, p: int, *, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """The unit frame F (C, p): simplex ETF with a bias, orthogonal frame without."""
    return (simplex_etf if problem.bias else orthogonal_frame)(problem.C, p, rng=rng)


def manifold_params(
    problem: UFMProblem, frame: np.ndarray, a: float, m: float, beta: float = 0.0
) -> UFMParams:
    """The point W = a F, H = m F[labels]^T (p, n), b = beta 1 (b only with a bias) of the manifold."""
    _margin(problem)
    H = m * frame[problem.labels].T
    return UFMParams(H, (a * frame,), np.full(problem.C, float(beta)) if problem.bias else None)


@dataclass(frozen=True)
class ReducedFlowResult:
    """Solution of the reduced flow.

    Attributes
    ----------
    t : (k,) times; a, m, beta : (k,) the coordinates (beta zeros without a bias); loss : (k,) the
    full loss there; eps : (k,) 1 - correct-class output (= 1 - a m - beta); nfev : evaluations of the
    field; success, status (0 t_max, 1 stationary), message; sol : dense output of the state or None.
    """

    t: np.ndarray
    a: np.ndarray
    m: np.ndarray
    beta: np.ndarray
    loss: np.ndarray
    eps: np.ndarray
    nfev: int
    success: bool
    status: int
    message: str
    sol: Any = field(default=None, repr=False)


def reduced_flow(
    problem: UFMProblem,
    a0: float,
    m0: float,
    beta0: float = 0.0,
    *,
    t_max: float = 1e6,
    t_eval: np.ndarray | None = None,
    method: str = "DOP853",
    rtol: float = 1e-12,
    atol: float = 1e-14,
    tol: float = 1e-10,
    dense_output: bool = False,
) -> ReducedFlowResult:
    """Integrate the reduced flow from (a0, m0, beta0) until |field| < tol or t_max (solve_ivp).

    Keep ``tol`` >= ~100 rtol: beta relaxes at rate 1 + lam_b, so explicit steps sit at their stability
    limit and the integration error floors |field| at about rtol.

    ``method`` is a solve_ivp name from ``ufm.dynamics.METHODS``.
    """
    _margin(problem)
    check_choice("method", method, [k for k, v in METHODS.items() if issubclass(v, ScipyIntegrator)])
    t_max = check_nonneg("t_max", t_max)
    y0 = np.array([a0, m0, beta0] if problem.bias else [a0, m0], dtype=float)
    counter = [0]

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        counter[0] += 1
        return reduced_field(problem, y)

    def stationary(t: float, y: np.ndarray) -> float:
        return float(np.linalg.norm(reduced_field(problem, y))) - tol

    stationary.terminal, stationary.direction = True, -1
    if t_max == 0:
        t, Y, status, sol = np.array([0.0]), y0[:, None], 0, None
    else:
        r = solve_ivp(
            fun, (0.0, t_max), y0, method=method, t_eval=t_eval, events=stationary, rtol=rtol, atol=atol,
            dense_output=dense_output,
        )  # fmt: skip
        if r.status < 0:
            return _package(problem, np.array([0.0]), y0[:, None], counter[0], -1, r.message, None)
        t, Y, status, sol = r.t, r.y, r.status, r.sol
        if status == 1 and (t.size == 0 or t[-1] < r.t_events[0][0]):
            t = np.append(t, r.t_events[0][0])
            Y = np.column_stack([Y, r.y_events[0][0]])
    msg = "stationary" if status == 1 else "reached t_max"
    return _package(problem, t, Y, counter[0], status, f"{msg} at t = {t[-1]:.6g}", sol)


def _package(problem, t, Y, nfev, status, message, sol) -> ReducedFlowResult:
    a, m = Y[0], Y[1]
    beta = Y[2] if problem.bias else np.zeros_like(a)
    loss = np.array([reduced_loss(problem, *s) for s in zip(a, m, beta)])
    return ReducedFlowResult(
        t=np.asarray(t, dtype=float), a=a, m=m, beta=beta, loss=loss, eps=1 - a * m - beta, nfev=int(nfev),
        success=status >= 0, status=int(status), message=message, sol=sol,
    )  # fmt: skip
