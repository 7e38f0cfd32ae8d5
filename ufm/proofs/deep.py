"""docs/theory.md §7, §8: the square-loss UFM with m = L + 1 factors and any class counts (derived here).

``ufm.closed_form_deep`` reduces the problem (penalty of a product = (m/2) c sum_j s_j^(2/m), cited,
not verified here; von Neumann's trace inequality, cited) to one scalar problem per target singular
value S: g(s) = (S - s)^2/(2n) + (m/2) c s^(2/m). These checks prove its algebra for symbolic S, s,
m, n, and check the built minimizers under ``ufm.model`` at sizes.
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form_deep as cfd
from ufm.model import UFMProblem, loss_and_grad

from ._core import Claim, numeric, register, with_overrides, zero

S, s, n, v = sympy.symbols("S s n v", positive=True)
k = sympy.Symbol("k", positive=True, integer=True)
M = k + 1  # m >= 2 factors
FORMULAS = {
    "value": cfd.deep_value,
    "stationary_decay": cfd.deep_stationary_decay,
    "value_at_root": cfd.deep_value_at_root,
    "threshold_root": cfd.deep_threshold_root,
    "root_limit": cfd.deep_root_limit,
}
# (C, counts, depth, lam_w, lam_h, bias): balanced and imbalanced, depth 2 and 3, on both sides.
NUMERIC_CASES = (
    (3, 4, 2, 0.03, 0.03, True), (3, 4, 2, 0.09, 0.09, True), (3, 2, 3, (0.05, 0.08, 0.04), 0.05, True),
    (3, (8, 4, 2), 2, 0.04, 0.04, False), (3, (8, 4, 2), 1, 0.12, 0.12, False), (4, (5, 3, 2, 2), 2, 0.02, 0.03, True),
)  # fmt: skip


def _numeric_residual() -> float:
    worst = 0.0
    for C_, counts, depth, lw, lh, bias in NUMERIC_CASES:
        problem = UFMProblem(C_, counts, lw, lh, depth=depth, bias=bias)
        opt = problem.loss.closed_form(problem)
        value, grad = loss_and_grad(problem, opt.build(C_ + 1, rng=1))
        worst = max(worst, abs(value - opt.loss), float(np.abs(grad.ravel()).max()))
    return worst


@register(
    "deep_threshold",
    "Deep linear UFM (m = L + 1 factors), per singular value, symbolic S, s, m, n: with n c = "
    "deep_stationary_decay(S, s, m) = (S - s) s^(1-2/m), s is a stationary point of g(s) = (S - s)^2/(2n) + "
    "(m/2) c s^(2/m) with value deep_value_at_root = (S - s)(S + (m-1)s)/(2n); g(0) - g(s) = "
    "s((m-1)s - (m-2)S)/(2n), so the root beats zero iff s > deep_threshold_root = (m-2)S/(m-1); "
    "deep_root_limit is the maximum of the decay over s, above deep_threshold_decay for m >= 3 (a root exists "
    "and zero wins between them); built minimizers (balanced and imbalanced, depth 1-3) stationary under "
    "ufm.model at the sizes of the assumptions. The Schatten-quasi-norm bound of the product is cited, not verified",
    "derived here (docs/theory.md §7, §8)",
    "S, s, n > 0 symbols, m = k + 1 with k a positive integer; s < S where signs matter (s = S/(1+v)); "
    f"numeric cases (C, counts, depth, lam_w, lam_h, bias) = {NUMERIC_CASES}",
)
def deep_threshold(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    c = f["stationary_decay"](S, s, M) / n
    g = f["value"](S, s, M, n, c)
    x = sympy.Symbol("x", positive=True)
    gx = f["value"](S, x, M, n, c)
    st = f["threshold_root"](S, M)
    s_max = (M - 2) * S / (2 * (M - 1))
    decay = f["stationary_decay"](S, x, M)
    return [
        zero("g'(s) = 0 at n c = deep_stationary_decay(S, s, m)", sympy.diff(gx, x).subs(x, s)),
        zero("g(s) = deep_value_at_root(S, s, m, n) at the root", g - f["value_at_root"](S, s, M, n)),
        zero("g(0) - g(root) = s((m-1)s - (m-2)S)/(2n)",
             S**2 / (2 * n) - f["value_at_root"](S, s, M, n) - s * ((M - 1) * s - (M - 2) * S) / (2 * n)),
        zero("the root ties with zero at deep_threshold_root = (m-2)S/(m-1)",
             S**2 / (2 * n) - f["value_at_root"](S, st, M, n)),
        zero("deep_root_limit is where d/ds (S - s) s^(1-2/m) = 0",
             sympy.diff(decay, x).subs(x, s_max)),
        zero("deep_root_limit = the decay at that s", f["root_limit"](S, M) - decay.subs(x, s_max)),
        zero("the threshold root lies above the maximizer by (m-2)S/(2(m-1)) >= 0, so the kept root is "
             "the larger one", st - s_max - (M - 2) * S / (2 * (M - 1))),
        numeric("deep_threshold_decay < deep_root_limit at S = 1, m = 3..10 (a root exists where zero wins)",
                max(cfd.deep_threshold_decay(1.0, m) - cfd.deep_root_limit(1.0, m) for m in range(3, 11)) > 0),
        numeric("deep_optimum(problem).build: gradient 0 and loss = closed form under ufm.model",
                _numeric_residual(), 1e-12),
    ]  # fmt: skip
