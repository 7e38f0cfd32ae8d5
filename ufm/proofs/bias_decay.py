"""docs/theory.md §6: the square-loss UFM with a regularized bias, lam_b > 0 (derived here).

After the reduction of §5.1 (penalty = sqrt(lam_w lam_h) ||Z||_*) and averaging over the relabelling
group, a minimizer is Z = q_perp Y~ + q_1 (1/C) 1 1^T, b = beta 1. The centred modes are those of §5;
the mean mode, with x = q_1/C + beta the mean output per class, costs

    phi(x, beta) = C/2 (x - 1/C)^2 + delta (x - beta) + lam_b C beta^2/2,     x - beta >= 0,

a convex quadratic on a half-plane, so a KKT point is its global minimum. These checks prove that the
library's formulas give that KKT point in each regime (symbolic C, N, lam_w, lam_h, lam_b), and check
the built minimizers under ``ufm.model`` at sizes.
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form
from ufm.model import UFMProblem, loss_and_grad

from ._core import Claim, numeric, positive, register, with_overrides, zero
from .symbols import C_GE2, N, lam_w, u

C = C_GE2
lam_b, t = sympy.symbols("lam_b t", positive=True)
FORMULAS = {
    "boundary": closed_form.ufm_bias_boundary,
    "bias_mean": closed_form.ufm_bias_mean,
    "bias_saturated": closed_form.ufm_bias_saturated,
    "mean_weight": closed_form.ufm_mean_weight_saturated,
    "mean_loss": closed_form.ufm_mean_loss_bias,
}
# Numeric checks: (C, N, lam, lam_b) on both sides of the boundary and of the collapse threshold.
NUMERIC_CASES = ((4, 5, 0.02, 1.0), (4, 5, 0.02, 0.1), (3, 2, 0.05, 3.0), (3, 2, 0.5, 1.0), (5, 1, 0.1, 0.5))


def _lam_h(delta):
    return delta**2 / (C**2 * N * lam_w)


def _phi(x, beta, delta):
    return C / 2 * (x - 1 / C) ** 2 + delta * (x - beta) + lam_b * C * beta**2 / 2


def _numeric_residual(rng: np.random.Generator) -> float:
    worst = 0.0
    for C_, N_, lam, lb in NUMERIC_CASES:
        problem = UFMProblem(C_, N_, lam, lam, lam_b=lb)
        opt = problem.loss.closed_form(problem)
        params = opt.build(C_ + 1, rng=rng)
        value, grad = loss_and_grad(problem, params)
        worst = max(worst, abs(value - opt.loss), float(np.abs(grad.ravel()).max()))
    return worst


@register(
    "bias_decay_kkt",
    "UFM with a regularized bias lam_b > 0, mean mode: the library's b, q_1 and mean cost are the KKT "
    "point (hence the global minimum) of the convex mean-mode problem in both regimes, symbolic C, N, lam_w, "
    "lam_h, lam_b: saturated (delta < lam_b/(1+lam_b): b = delta/(lam_b C), q_1 = 1 - delta - delta/lam_b > 0) "
    "and bias carries the mean (b = 1/(C(1+lam_b)), multiplier delta - lam_b/(1+lam_b) >= 0); the two meet "
    f"continuously at the boundary; built minimizers stationary under ufm.model at (C, N, lam, lam_b) = "
    f"{', '.join(map(str, NUMERIC_CASES))}",
    "derived here (docs/theory.md §6)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w, lam_b > 0; lam_h = delta^2/(C^2 N lam_w) with "
    "delta = boundary/(1+u) (saturated) or boundary + t (carries the mean), u, t > 0",
)
def bias_decay_kkt(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    x, beta = sympy.symbols("x beta", real=True)
    boundary = f["boundary"](lam_b)
    claims = [
        positive("phi is convex: d2phi/dbeta2 = lam_b C > 0", sympy.diff(_phi(x, beta, 0), beta, 2)),
        positive("phi is convex: det of its Hessian C * lam_b C > 0",
                 sympy.hessian(_phi(x, beta, 0), (x, beta)).det()),
    ]  # fmt: skip
    # Saturated side: an interior stationary point with x - beta = q_1/C > 0.
    delta = boundary / (1 + u)
    lh = _lam_h(delta)
    b_s = f["bias_saturated"](C, N, lam_w, lh, lam_b)
    q1 = f["mean_weight"](C, N, lam_w, lh, lam_b)
    x_s = q1 / C + b_s
    claims += [
        zero("saturated: dphi/dx = 0", sympy.diff(_phi(x, beta, delta), x).subs({x: x_s, beta: b_s})),
        zero("saturated: dphi/dbeta = 0", sympy.diff(_phi(x, beta, delta), beta).subs({x: x_s, beta: b_s})),
        positive("saturated: q_1 = ufm_mean_weight_saturated > 0 below the boundary", q1),
        zero("saturated: phi = ufm_mean_loss_bias(saturated)",
             _phi(x_s, b_s, delta) - f["mean_loss"](C, N, lam_w, lh, lam_b, True)),
    ]  # fmt: skip
    # The other side: x = beta on the constraint, multiplier dphi/dx >= 0 (moving mean into the features
    # costs more than it saves).
    delta = boundary + t
    lh = _lam_h(delta)
    b_m = f["bias_mean"](C, lam_b)
    dphi = sympy.diff(_phi(x, x, delta), x)
    claims += [
        zero("carries the mean: d/dx phi(x, x) = 0 at x = beta = ufm_bias_mean", dphi.subs(x, b_m)),
        zero("carries the mean: KKT multiplier dphi/dx = delta - ufm_bias_boundary",
             sympy.diff(_phi(x, beta, delta), x).subs({x: b_m, beta: b_m}) - (delta - boundary)),
        zero("carries the mean: phi = ufm_mean_loss_bias(not saturated)",
             _phi(b_m, b_m, delta) - f["mean_loss"](C, N, lam_w, lh, lam_b, False)),
    ]  # fmt: skip
    # Continuity at the boundary.
    lh = _lam_h(boundary)
    claims += [
        zero("boundary: q_1 = 0", f["mean_weight"](C, N, lam_w, lh, lam_b)),
        zero("boundary: the two biases agree", f["bias_saturated"](C, N, lam_w, lh, lam_b) - f["bias_mean"](C, lam_b)),
        zero("boundary: the two mean costs agree",
             f["mean_loss"](C, N, lam_w, lh, lam_b, True) - f["mean_loss"](C, N, lam_w, lh, lam_b, False)),
        numeric("ufm_optimum(lam_b).build: gradient 0 and loss = closed form under ufm.model",
                _numeric_residual(rng), 1e-12),
    ]  # fmt: skip
    return claims
