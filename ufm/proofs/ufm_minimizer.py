"""docs/theory.md §5: the global minimizer of the regularized square-loss UFM (derived here).

``ufm.closed_form``'s module docstring holds the derivation; these proofs check each step on the
library's own expressions.

Stationarity. Every minimizer is rotation-equivalent to one in p = C dimensions (W -> W Q, H -> Q^T H
with Q (C, p) orthonormal rows changes neither loss nor gradient norms), where everything lies in the
I/J algebra: F = sqrt(C/(C-1)) (I - J/C) (simplex ETF rows, with a bias) or F = I (orthogonal frame,
without), W = a F, H = m F Y, b 1^T = J Y / C, a^2 = ufm_w_row_norm_sq, m^2 = ufm_h_norm_sq. With the
residual R Y = W H + b 1^T - Y, R = a m F^2 + J/C - I (no J/C without a bias), and Y Y^T = N I:

    dL/dW = (m/C) R F + lam_w a F,   dL/dH = [a/(NC) F R + lam_h m F] Y,   dL/db = R 1 / C,
    L     = R_F^2 / (2C) + lam_w/2 a^2 ||F||^2 + lam_h/2 m^2 N ||F||^2.

Global optimality (the reduction of the docstring, steps 1-3):
1. lam_w/2 w^2 + lam_h/2 h^2 - sqrt(lam_w lam_h) w h = 1/2 (sqrt(lam_w) w - sqrt(lam_h) h)^2 >= 0, so
   the penalty is at least sqrt(lam_w lam_h) ||W H||_* (with ||Z||_* <= ||W||_F ||H||_F for Z = W H);
   the built point attains this bound.
2. With a bias, centring H (H -> H (I - 11^T/n), b -> b + W H 1/n) keeps the outputs and does not raise
   ||H||; then Z 1 = 0 and ||Z + b 1^T - Y||^2 = ||Z - Y~||^2 + n ||b - 1/C||^2 (Pythagoras), so
   b = 1/C and the targets are Y~ = (I - J/C) Y, with Y~ Y~^T = N (I - J/C): singular value sqrt(N),
   k = C-1 times. Without a bias the targets are Y: sqrt(N), k = C times.
3. By von Neumann's trace inequality the problem decouples over singular values into
   g(s) = 1/(2NC) (sqrt(N) - s)^2 + sqrt(lam_w lam_h) s, s >= 0: convex, minimized at
   s* = sqrt(N)(1 - delta) if delta < 1 and at s = 0 otherwise (g'(0) has the sign of delta - 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from ufm import closed_form
from ufm.model import UFMProblem, loss_and_grad, outputs

from ._core import Claim, numeric, positive, register, with_overrides, zero
from .algebra import IJ
from .symbols import C_GE2, N, lam_h, lam_w, u

C = C_GE2  # the whole module works on C = k + 1 >= 2, so that sqrt((C-1) x) splits
LAM_H = 1 / ((1 + u) ** 2 * C**2 * N * lam_w)  # collapse side: delta = 1/(1 + u) < 1
# Pythagoras of step 2 is checked on explicit symbolic matrices at these (C, N).
BIAS_SIZES = ((2, 1), (2, 2), (3, 1), (3, 2), (4, 1))
# Numeric cross-checks of ufm_optimum: random (C, N), lam_w lam_h as a fraction of the collapse bound.
OPTIMUM_CASES = 6
# Tolerance of the numeric checks relative to the size of the compared quantities.
REL_TOL = 1e-9

FORMULAS = {
    "delta": closed_form.ufm_delta,
    "eps": closed_form.ufm_eps,
    "f_other": closed_form.ufm_f_other,
    "w_row_norm_sq": closed_form.ufm_w_row_norm_sq,
    "h_norm_sq": closed_form.ufm_h_norm_sq,
    "loss": closed_form.ufm_loss,
    "zero_loss": closed_form.ufm_zero_loss,
    "collapse_bound": closed_form.ufm_collapse_bound,
}


def _frame(bias: bool) -> IJ:
    """Unit-row frame in p = C: the simplex ETF with a bias, the orthogonal frame I without."""
    return sympy.sqrt(C / (C - 1)) * IJ.centring(C) if bias else IJ.identity(C)


def _optimum_numeric_residual(f: dict, bias: bool, rng: np.random.Generator) -> float:
    """Worst relative disagreement between ufm_optimum, its .build, ufm.model and the closed forms."""
    worst = 0.0
    for _ in range(OPTIMUM_CASES):
        C_, N_ = int(rng.integers(2, 9)), int(rng.integers(1, 6))
        bound = float(closed_form.ufm_collapse_bound(C_, N_))
        ratio = float(rng.uniform(0.2, 5.0))
        collapsed = bool(rng.random() < 0.7)
        product = bound * float(rng.uniform(0.05, 0.95) if collapsed else rng.uniform(1.05, 3.0))
        lw, lh = np.sqrt(product * ratio), np.sqrt(product / ratio)
        opt = closed_form.ufm_optimum(C_, N_, lw, lh, bias=bias)
        problem = UFMProblem(C_, N_, lam_w=lw, lam_h=lh, bias=bias)
        params = opt.build(C_ + 2, rng=rng)
        value, grad = loss_and_grad(problem, params)
        if collapsed:
            expect = {
                "delta": f["delta"](C_, N_, lw, lh), "eps": f["eps"](C_, N_, lw, lh, bias),
                "f_other": f["f_other"](C_, N_, lw, lh, bias), "w_row_norm_sq": f["w_row_norm_sq"](C_, N_, lw, lh, bias),
                "h_norm_sq": f["h_norm_sq"](C_, N_, lw, lh, bias), "loss": f["loss"](C_, N_, lw, lh, bias),
            }  # fmt: skip
            fout = outputs(problem, params)
            means = params.H @ problem.Y.T / N_  # (p, C) class means, uncentred
            measured = {
                "f_other": fout[(problem.labels + 1) % C_, np.arange(problem.n)].mean(),
                "eps": 1 - fout[problem.labels, np.arange(problem.n)].mean(),
                "w_row_norm_sq": (params.W**2).sum(axis=1).max(), "h_norm_sq": (means**2).sum(axis=0).max(),
            }  # fmt: skip
        else:
            expect = {"delta": f["delta"](C_, N_, lw, lh), "loss": f["zero_loss"](C_, bias)}
            measured = {}
        fields = {name: getattr(opt, name) for name in expect}
        fields["lam_product_max"] = opt.lam_product_max
        expect["lam_product_max"] = f["collapse_bound"](C_, N_)
        for name, want in expect.items():
            for got in (fields[name], measured.get(name, fields[name])):
                worst = max(worst, abs(float(got) - float(want)) / max(1.0, abs(float(want))))
        worst = max(worst, abs(value - float(expect["loss"])), np.abs(grad.ravel()).max())
    return worst


def _stationarity(bias: bool, rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    tag = "with bias" if bias else "no bias"
    F = _frame(bias)
    I = IJ.identity(C)
    a2, m2 = f["w_row_norm_sq"](C, N, lam_w, LAM_H, bias), f["h_norm_sq"](C, N, lam_w, LAM_H, bias)
    a, m = sympy.sqrt(a2), sympy.sqrt(m2)
    R = a * m * F * F - I + (IJ.ones(C) / C if bias else 0 * I)  # W H + b 1^T - Y = R Y
    dW = (m / C) * R * F + lam_w * a * F
    dH = a / (N * C) * F * R + LAM_H * m * F
    loss_built = R.frob_sq / (2 * C) + lam_w / 2 * a2 * (F * F).trace + LAM_H / 2 * m2 * N * (F * F).trace
    out = R + I  # outputs f = (R + I) Y
    claims = [
        zero(
            f"delta = ufm_delta = 1/(1+u) on the collapse side ({tag})",
            f["delta"](C, N, lam_w, LAM_H) - 1 / (1 + u),
        ),
        positive(f"ufm_w_row_norm_sq > 0 for delta < 1 ({tag})", a2),
        positive(f"ufm_h_norm_sq > 0 for delta < 1 ({tag})", m2),
        zero(f"frame rows are unit vectors ({tag})", (F * F).diag - 1),
        *(zero(f"stationarity dL/dW = 0 ({tag})", r) for r in dW.coefficients()),
        *(zero(f"stationarity dL/dH = 0 ({tag})", r) for r in dH.coefficients()),
        zero(f"L at the built point = ufm_loss ({tag})", loss_built - f["loss"](C, N, lam_w, LAM_H, bias)),
        zero(
            f"correct-class output = 1 - ufm_eps ({tag})", out.diag - (1 - f["eps"](C, N, lam_w, LAM_H, bias))
        ),
        zero(f"wrong-class output = ufm_f_other ({tag})", out.off - f["f_other"](C, N, lam_w, LAM_H, bias)),
    ]
    if bias:
        eps_ = f["eps"](C, N, lam_w, LAM_H, bias)
        claims += [
            zero("stationarity dL/db = R 1/C = 0 (with bias, lam_b = 0)", R.row_sum / C),
            zero("mu_G = m F 1/C = 0: features centred (with bias)", F.row_sum),
            zero("cosine of distinct W rows / class means = sqi_cosine (with bias)",
                 (F * F).off / (F * F).diag - closed_form.sqi_cosine(C)),
            zero("SQI: wrong-class output = eps/(C-1) (with bias)", out.off - eps_ / (C - 1)),
            zero("Theorem NC3 holds at the minimizer: a/m = sqi_w_scale(C, eps, lam_w)",
                 a / m - closed_form.sqi_w_scale(C, eps_, lam_w)),
            zero("Theorem NC2 holds at the minimizer: ||W_c||^2 = sqi_w_row_norm_sq(C, eps, lam_w)",
                 a2 - closed_form.sqi_w_row_norm_sq(C, eps_, lam_w)),
        ]  # fmt: skip
    else:
        centred = m2 * IJ.centring(C)  # Gram of mu_c - mu_G = m (I - J/C) e_c (F = I)
        claims += [
            zero("cosine of distinct W rows / uncentred class means = 0 (no bias)", (F * F).off),
            zero("centred class means: cosine sqi_cosine(C) = -1/(C-1) (no bias)",
                 centred.off / centred.diag - closed_form.sqi_cosine(C)),
            zero("centred class means: ||mu_c - mu_G||^2 = ufm_h_norm_sq (1 - 1/C) (no bias)",
                 centred.diag - m2 * (1 - 1 / C)),
        ]  # fmt: skip
    claims.append(numeric(f"ufm_optimum fields, .build and ufm.model agree with the closed forms ({tag}; "
                          "gradient 0, loss = ufm_loss, measured norms and outputs)",
                          _optimum_numeric_residual(f, bias, rng), REL_TOL))  # fmt: skip
    return claims


@register(
    "ufm_stationarity_bias",
    "UFM minimizer with bias (simplex ETF): the closed forms (delta, eps, f_other, norms, loss) satisfy "
    "dL/dW = dL/dH = dL/db = 0 and match the theorem's SQI formulas (symbolic C, N, lam_w, lam_h on delta < 1)",
    "derived here (docs/theory.md §5)",
    "C >= 2 integer (C = k + 1), N positive integer, lam_w > 0, lam_h = 1/((1+u)^2 C^2 N lam_w) with u > 0; lam_b = 0",
)
def ufm_stationarity_bias(rng: np.random.Generator, **formulas) -> list[Claim]:
    return _stationarity(True, rng, **formulas)


@register(
    "ufm_stationarity_nobias",
    "UFM minimizer without bias (orthogonal frame): the closed forms satisfy dL/dW = dL/dH = 0 "
    "(symbolic C, N, lam_w, lam_h on delta < 1)",
    "derived here (docs/theory.md §5)",
    "C >= 2 integer (C = k + 1), N positive integer, lam_w > 0, lam_h = 1/((1+u)^2 C^2 N lam_w) with u > 0",
)
def ufm_stationarity_nobias(rng: np.random.Generator, **formulas) -> list[Claim]:
    return _stationarity(False, rng, **formulas)


@register(
    "ufm_global",
    "UFM global optimality, the scalar steps, symbolic C, N, lam_w, lam_h: the AM-GM identity behind "
    "penalty >= sqrt(lam_w lam_h) ||W H||_* and its attainment at the built point, the targets' Gram eigenvalues N "
    "(C-1 times with a bias, C without), the per-singular-value soft threshold s* = sqrt(N)(1 - delta) and its value "
    "(k/C)(delta - delta^2/2) against the zero solution k/(2C), collapse iff lam_w lam_h < 1/(N C^2). The matrix "
    "steps (||W H||_* <= ||W|| ||H||, the von Neumann reduction to singular values) are cited, not verified; the "
    "bias centring (Pythagoras) is checked at (C, N) = " + ", ".join(map(str, BIAS_SIZES)),
    "derived here (docs/theory.md §5.1; ufm.closed_form docstring steps 1-3)",
    "C >= 2 integer (C = k + 1), N positive integer, lam_w, lam_h > 0 (delta < 1 via u > 0 where needed)",
)
def ufm_global(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    w, h, s = sympy.symbols("w h s", real=True)
    claims = [
        zero("step 1 (AM-GM): lam_w/2 w^2 + lam_h/2 h^2 - sqrt(lam_w lam_h) w h = (sqrt(lam_w) w - sqrt(lam_h) h)^2/2",
             lam_w / 2 * w**2 + lam_h / 2 * h**2 - sympy.sqrt(lam_w * lam_h) * w * h
             - (sympy.sqrt(lam_w) * w - sympy.sqrt(lam_h) * h) ** 2 / 2),
    ]  # fmt: skip
    for bias in (True, False):
        tag = "with bias" if bias else "no bias"
        F = _frame(bias)
        rank = C - 1 if bias else C
        a2, m2 = f["w_row_norm_sq"](C, N, lam_w, LAM_H, bias), f["h_norm_sq"](C, N, lam_w, LAM_H, bias)
        Z = sympy.sqrt(a2) * sympy.sqrt(m2) * F * F  # W H = Z Y
        # singular values of Z Y: sqrt(N) |eigenvalues of Z|; Z is PSD (positive eigenvalue on 1^perp)
        nuclear = sympy.sqrt(N) * ((C - 1) * Z.eig_perp + Z.row_sum)
        penalty = lam_w / 2 * a2 * (F * F).trace + LAM_H / 2 * m2 * N * (F * F).trace
        targets = N * (IJ.centring(C) if bias else IJ.identity(C))  # T T^T, T = Y~ or Y
        tau = sympy.sqrt(lam_w * lam_h)
        g = (sympy.sqrt(N) - s) ** 2 / (2 * N * C) + tau * s  # step 3, per singular value
        s_star = sympy.solve(sympy.diff(g, s), s)[0]
        delta = f["delta"](C, N, lam_w, lam_h)
        collapse = {lam_h: LAM_H}
        claims += [
            zero(f"step 1: the minimizer attains the bound, penalty = sqrt(lam_w lam_h) ||W H||_* ({tag})",
                 penalty - sympy.sqrt(lam_w * LAM_H) * nuclear),
            zero(f"step 2: targets' singular values are sqrt(N), {'C-1' if bias else 'C'} times ({tag})",
                 targets.eig_perp - N),
            zero(f"step 2: the remaining singular value is {'0' if bias else 'sqrt(N)'} ({tag})",
                 targets.row_sum - (0 if bias else N)),
            positive("step 3: g is strictly convex, g'' = 1/(NC) > 0", sympy.diff(g, s, 2)),
            zero(f"step 3: soft threshold s* = sqrt(N)(1 - ufm_delta) ({tag})", s_star - sympy.sqrt(N) * (1 - delta)),
            zero(f"step 3: g'(0) NC/sqrt(N) = delta - 1, so s = 0 is optimal iff delta >= 1 ({tag})",
                 sympy.diff(g, s).subs(s, 0) * N * C / sympy.sqrt(N) - (delta - 1)),
            zero(f"step 3: k g(s*) = ufm_loss ({tag})",
                 (rank * g.subs(s, s_star) - f["loss"](C, N, lam_w, lam_h, bias)).subs(collapse)),
            zero(f"step 3: k g(0) = ufm_zero_loss ({tag})", rank * g.subs(s, 0) - f["zero_loss"](C, bias)),
            positive(f"step 3: ufm_zero_loss - ufm_loss > 0 for delta < 1 ({tag})",
                     (f["zero_loss"](C, bias) - f["loss"](C, N, lam_w, lam_h, bias)).subs(collapse)),
            zero(f"ufm_loss = ufm_zero_loss at the threshold delta = 1 (continuity, {tag})",
                 (f["loss"](C, N, lam_w, lam_h, bias) - f["zero_loss"](C, bias)).subs(lam_h, 1 / (C**2 * N * lam_w))),
        ]  # fmt: skip
    bound = f["collapse_bound"](C, N)
    claims += [
        zero(
            "threshold: delta^2 = lam_w lam_h / ufm_collapse_bound, so delta < 1 iff lam_w lam_h < bound",
            f["delta"](C, N, lam_w, lam_h) ** 2 - lam_w * lam_h / bound,
        ),
        *bias_pythagoras(),
    ]
    return claims


def bias_pythagoras(a: Any = 0, sizes: tuple = BIAS_SIZES, step: str = "step 2") -> list[Claim]:
    """The bias step at given sizes: Z 1 = 0 gives ||Z + b 1^T - T||^2 = ||Z - T~||^2 + n ||b - 1/C||^2,
    for the targets T = (1 - a) Y + a/C (a = 0: one-hot) and their centred part T~ = (1 - a)(Y - 11^T/C)."""
    claims = []
    smoothed = " with smoothed targets" if a != 0 else ""
    for C_, N_ in sizes:
        n = C_ * N_
        Y = sympy.Matrix(C_, n, lambda c, i, N_=N_: 1 if i // N_ == c else 0)
        T = (1 - a) * Y + a / C_ * sympy.ones(C_, n)
        free = sympy.Matrix(C_, n - 1, lambda i, j: sympy.Symbol(f"z_{i}_{j}", real=True))
        Z = free.row_join(-free * sympy.ones(n - 1, 1))  # rows sum to zero: Z 1 = 0
        b = sympy.Matrix(C_, 1, lambda i, _: sympy.Symbol(f"b_{i}", real=True))
        Tc = (1 - a) * (Y - sympy.ones(C_, n) / C_)
        lhs = sum(x**2 for x in Z + b * sympy.ones(1, n) - T)
        rhs = sum(x**2 for x in Z - Tc) + n * sum(x**2 for x in b - sympy.ones(C_, 1) / C_)
        claims.append(zero(f"{step} (bias): Pythagoras{smoothed} at C = {C_}, N = {N_}", lhs - rhs))
    return claims
