"""docs/theory.md §9: the cross-entropy UFM at depth 1, balanced (derived here on the ETF manifold).

``ufm.closed_form_ce`` reduces the loss on W = alpha F, H = m F[labels]^T (F a unit simplex ETF) to
L(u) = log(1 + (C-1) e^(-C u/(C-1))) + eps_a C u/(C-1) + delta u after AM-GM on the penalty. These
checks prove, for symbolic C, N, lam_w, lam_h and a, that the library's correct logit is the
stationary point of L(u) and that its value is ``ce_loss``; and check at sizes that the built point
is a stationary point of the full model. Global optimality over all (W, H, b) at a = 0 is Zhu et
al.'s theorem [ZDZ+21], cited, not verified here.
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form_ce as cfce
from ufm.model import UFMProblem, loss_and_grad

from ._core import Claim, numeric, positive, register, with_overrides, zero
from .symbols import C_GE2, N, lam_w, u

C = C_GE2
v = sympy.Symbol("v", positive=True)
Y_ANY = sympy.Symbol("y", positive=True)  # e^(-C u/(C-1)) at any u
A_LS = 1 / (1 + v)  # label smoothing a in (0, 1)
FORMULAS = {"eps": cfce.ce_eps, "correct_logit": cfce.ce_correct_logit, "loss": cfce.ce_loss}
# (C, N, lam_w, lam_h, a, bias) on both sides of delta = 1 - a.
NUMERIC_CASES = (
    (3, 2, 0.02, 0.02, 0.0, True), (4, 3, 0.01, 0.03, 0.1, False), (5, 1, 0.05, 0.02, 0.0, True),
    (3, 2, 0.3, 0.3, 0.0, True),
)  # fmt: skip


def _numeric_residual() -> float:
    worst = 0.0
    for C_, N_, lw, lh, a, bias in NUMERIC_CASES:
        problem = UFMProblem(C_, N_, lw, lh, loss="ce", bias=bias, label_smoothing=a)
        opt = problem.loss.closed_form(problem)
        value, grad = loss_and_grad(problem, opt.build(C_, rng=2))
        worst = max(worst, abs(value - opt.loss), float(np.abs(grad.ravel()).max()))
    return worst


def _claims(f: dict, a) -> list[Claim]:
    delta = (1 - a) / (1 + u)  # delta < 1 - a
    lam_h = delta**2 / (C**2 * N * lam_w)
    eps_a = a * (C - 1) / C
    eps = f["eps"](C, N, lam_w, lam_h, a)
    logit = f["correct_logit"](C, eps)
    # y = e^(-C u/(C-1)) = p_wrong/p_correct per wrong class: L(u) = log(1 + (C-1) y) + (eps_a C/(C-1) + delta) u,
    # dL/du = C/(C-1) (eps_a - (C-1) y/(1 + (C-1) y)) + delta, d2L/du2 = (C/(C-1))^2 (C-1) y/(1 + (C-1) y)^2.
    y = sympy.exp(sympy.cancel(-C * logit / (C - 1)))  # cancel exposes exp(-log(...)) = 1/(...)
    tag = "a = 0" if a == 0 else "smoothing a"
    return [
        positive(f"ce_eps in (0, (C-1)/C) on delta < 1 - a, so the logit is positive ({tag})", (C - 1) / C - eps),
        zero(f"dL/du = 0 at u = ce_correct_logit(C, ce_eps) ({tag})",
             C / (C - 1) * (eps_a - (C - 1) * y / (1 + (C - 1) * y)) + delta),
        # L(u) = log(1 + (C-1) y) + (eps_a C/(C-1) + delta) u, term by term against ce_loss:
        zero(f"1 + (C-1) y = 1/(1 - eps) at that u, so log(1 + (C-1) y) = -log(1 - eps) ({tag})",
             1 + (C - 1) * y - 1 / (1 - eps)),
        zero(f"(eps_a C/(C-1) + delta) u = eps x with x = ce_logit_gap ({tag})",
             (eps_a * C / (C - 1) + delta) * (C - 1) / C - eps),
        zero(f"ce_loss(C, eps) = -log(1 - eps) + eps x ({tag})",
             f["loss"](C, eps) - (-sympy.log(1 - eps) + eps * cfce.ce_logit_gap(C, eps))),
        zero(f"ce_correct_logit = (C-1)/C ce_logit_gap ({tag})",
             logit - (C - 1) * cfce.ce_logit_gap(C, eps) / C),
        positive(f"L is strictly convex in u: d2L/du2 = (C/(C-1))^2 (C-1) y/(1 + (C-1) y)^2 > 0 for every y > 0 ({tag})",
                 (C / (C - 1)) ** 2 * (C - 1) * Y_ANY / (1 + (C - 1) * Y_ANY) ** 2),
    ]  # fmt: skip


@register(
    "ce_etf_stationary",
    "Cross-entropy UFM, depth 1, balanced: on the simplex-ETF manifold the correct logit ce_correct_logit = "
    "(C-1)/C log((C-1)(1-eps)/eps), eps = ce_eps = a(C-1)/C + (C-1)delta/C, is the minimum of the convex reduced "
    "loss, with value ce_loss = -log(1-eps) + eps log((C-1)(1-eps)/eps), symbolic C, N, lam_w, lam_h, a on "
    "delta < 1 - a; the built point is a stationary point of ufm.model (with and without a bias) checked at "
    f"(C, N, lam_w, lam_h, a, bias) = {', '.join(map(str, NUMERIC_CASES))}. Global optimality: [ZDZ+21] at a = 0, "
    "cited, not verified",
    "derived here (docs/theory.md §9)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w > 0; lam_h = delta^2/(C^2 N lam_w), delta = (1-a)/(1+u), "
    "u > 0; a = 0 or a = 1/(1+v), v > 0",
)
def ce_etf_stationary(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    claims = _claims(f, 0) + _claims(f, A_LS)
    claims.append(
        numeric("ce_optimum.build: gradient 0 and loss = ce_loss under ufm.model", _numeric_residual(), 1e-12)
    )
    return claims
