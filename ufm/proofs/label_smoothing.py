"""docs/theory.md §5 with label smoothing: the global minimizer of the square-loss UFM whose targets are
T = (1 - a) Y + (a/C) 1 1^T, 0 < a < 1 (derived here; §4.3 and §5.3 for the link to SQI).

The checks evaluate ``ufm.closed_form``'s own functions (``ufm_eps``, ``ufm_loss``, ``ufm_cos_w``, ...
with ``label_smoothing=a``) on SymPy symbols, so they prove the very expressions the library computes.

Derivation (the steps of docs/theory.md §5.1). Write P_perp = I - J/C and P_1 = J/C (orthogonal
idempotents, J = 11^T, C x C).

1. Penalty: lam_w/2 ||W||^2 + lam_h/2 ||H||^2 >= sqrt(lam_w lam_h) ||W H||_*, with equality at a
   balanced factorization (the AM-GM identity is proved in ``ufm_global``; attainment here).
2. Targets: T = A Y with A = (1 - a) I + (a/C) J = (1 - a) P_perp + P_1, and T T^T = N A^2, so T's
   singular values are sqrt(N)(1 - a), C-1 times (the class contrasts), and sqrt(N) once (the mean).
3. Bias: the mean column of T is A 1/C = 1/C, so with a free bias b = 1/C and the targets become the
   centred (1 - a) P_perp Y (Pythagoras); without a bias the targets are T itself.
4. Soft thresholding at sqrt(N) delta, delta = C sqrt(N lam_w lam_h): a target singular value
   sqrt(N) sigma is kept as sqrt(N)(sigma - delta) at cost g(sigma) = (delta sigma - delta^2/2)/C when
   sigma > delta, and set to zero at cost sigma^2/(2C) otherwise (g is convex; g'(0) has the sign of
   delta - sigma). The minimal loss is the sum of g over the singular values to fit.

Regimes (docs/theory.md §5.2; Z = W H = M Y):

* with a bias, delta < 1 - a: M = (1 - a - delta) P_perp, a simplex ETF; eps = (C-1)(a + delta)/C,
  f_other = (a + delta)/C = eps/(C-1) (SQI), loss (C-1)/C (delta(1 - a) - delta^2/2); otherwise zero,
  loss (C-1)(1 - a)^2/(2C);
* without a bias, delta < 1 - a: M = A - delta I = (1 - a - delta) P_perp + (1 - delta) P_1 (the
  "smoothed frame", cosine a/((1 - a - delta)(C-1) + 1 - delta)), f_other = a/C;
  1 - a <= delta < 1: rank one, M = (1 - delta) P_1; delta >= 1: zero.

At a point W = alpha F, H = m F Y, b 1^T = (J/C) Y (bias only), with F the unit-row frame whose Gram is
(1 - cos_w) I + cos_w J, the residual is R Y with R = alpha m F^2 + J/C - A (no J/C without a bias),
and the gradients and loss are those of ``ufm_minimizer`` with A in place of I:

    dL/dW = (m/C) R F + lam_w alpha F,   dL/dH = [alpha/(NC) F R + lam_h m F] Y,   dL/db = R 1/C,
    L     = ||R||_F^2/(2C) + lam_w/2 alpha^2 ||F||^2 + lam_h/2 m^2 N ||F||^2.

SymPy cannot declare 0 < a < 1 or delta < 1 - a, so the regimes are parametrized by positive symbols:
a = 1/(1 + v); delta = (1 - a)/(1 + u) on the collapse side; delta = 1 - a/(1 + w) on the rank-one
side; lam_h = delta^2/(C^2 N lam_w) then gives ufm_delta = delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from ufm import closed_form
from ufm.model import UFMProblem, loss_and_grad, outputs

from ._core import Claim, numeric, positive, register, with_overrides, zero
from .algebra import IJ
from .symbols import C_GE2, N, eps, lam_h, lam_w, u
from .ufm_minimizer import FORMULAS as MINIMIZER_FORMULAS
from .ufm_minimizer import bias_pythagoras

C = C_GE2  # C = k + 1 >= 2, so that the signs of C - 1 are known
v, w = sympy.symbols("v w", positive=True)
a = sympy.Symbol("a", positive=True)  # plain label smoothing, where an identity holds for every a
A_LS = 1 / (1 + v)  # label smoothing a in (0, 1)
DELTA = {
    "collapse": v / ((1 + v) * (1 + u)),  # (1 - a)/(1 + u) < 1 - a
    "rank_one": (v + w + v * w) / ((1 + v) * (1 + w)),  # 1 - a/(1 + w), in (1 - a, 1)
}
REGIME_TEXT = {"collapse": "delta < 1 - a", "rank_one": "1 - a < delta < 1"}
# Pythagoras for the bias (step 3) on explicit symbolic matrices with smoothed targets at these (C, N).
BIAS_SIZES = ((2, 1), (2, 2), (3, 1), (4, 1))
# Numeric checks of ufm_optimum(..., label_smoothing=a).build against ufm.model at these sizes (C, N),
# smoothings a and ratios lam_w/lam_h (the minimizer depends on the ratio only through its scale);
# _numeric_cases puts delta inside each regime.
NUMERIC_SIZES = ((2, 1), (3, 2), (5, 3))
NUMERIC_SMOOTHING = (0.0, 0.1, 0.35)
NUMERIC_RATIOS = (0.5, 3.0)
# Tolerance of the numeric checks relative to the size of the compared quantities (float64 algebra
# on O(1) numbers at n <= 15 examples).
REL_TOL = 1e-9

# The geometries of the minimizer with an unregularized bias or none ("other" needs lam_b > 0, §6).
DEPTH1_GEOMETRIES = tuple(g for g in closed_form.GEOMETRIES if g != "other")
# The library's formulas the proofs evaluate: the minimizer proof's, plus those label smoothing adds.
FORMULAS = {
    **MINIMIZER_FORMULAS,
    "norm_product": closed_form.ufm_norm_product,
    "w_scale": closed_form.ufm_w_scale,
    "cos_w": closed_form.ufm_cos_w,
    "rank_one_loss": closed_form.ufm_rank_one_loss,
    "smoothing_eps": closed_form.ufm_smoothing_eps,
}


def _targets(C_: Any, a_: Any) -> IJ:
    """A = (1 - a) I + (a/C) J, so that the smoothed targets are T = A Y."""
    return IJ(C_, 1 - a_, a_ / C_)


def _lam_h(delta: Any) -> Any:
    """lam_h with ufm_delta(C, N, lam_w, lam_h) = delta."""
    return delta**2 / (C**2 * N * lam_w)


def _positive_root(x: Any) -> Any:
    """sqrt of a positive expression, factored first so that SymPy splits the root of the product."""
    return sympy.sqrt(sympy.factor(sympy.cancel(x)))


@dataclass(frozen=True)
class _Point:
    """A point W = alpha F, H = m F Y (b = 1/C with a bias) in p = C, everything in the I/J algebra.

    Attributes
    ----------
    delta, lam_h : the regime's delta and the lam_h that gives it.
    a2, m2 : alpha^2 = ||W_c||^2 and m^2 = ||mu_c||^2; cos : cosine of distinct W rows.
    F : unit-row frame (Gram (1 - cos) I + cos J); Z : W H = Z Y.
    R : residual W H + b 1^T - T = R Y; out : outputs f = out Y.
    dW, dH, db : the gradients (dH as the C x C block in front of Y); loss : L at the point.
    """

    delta: Any
    lam_h: Any
    a2: Any
    m2: Any
    cos: Any
    F: IJ
    Z: IJ
    R: IJ
    out: IJ
    dW: IJ
    dH: IJ
    db: Any
    loss: Any


def _point(f: dict, bias: bool, regime: str) -> _Point:
    """The minimizer of ``regime`` built from the library's closed forms (rank one: q = (1 - delta)/C)."""
    delta = DELTA[regime]
    lam_h_ = _lam_h(delta)
    args = (C, N, lam_w, lam_h_)
    if regime == "collapse":
        a2 = f["w_row_norm_sq"](*args, bias, label_smoothing=A_LS)
        m2 = f["h_norm_sq"](*args, bias, label_smoothing=A_LS)
        cos = f["cos_w"](*args, bias, label_smoothing=A_LS)
    else:  # rank one (no bias): only the mean mode, sqrt(N)(1 - delta), survives; W rows coincide
        q, s = (1 - delta) / C, f["w_scale"](N, lam_w, lam_h_)
        a2, m2, cos = s * q, q / s, sympy.Integer(1)
    F = IJ(C, 1 - cos, cos).sqrt()  # F F = (1 - cos) I + cos J: unit rows with cosine cos
    alpha, m = _positive_root(a2), _positive_root(m2)
    T = _targets(C, A_LS)
    Z = alpha * m * F * F
    R = Z + (IJ.ones(C) / C if bias else 0 * IJ.identity(C)) - T
    FF = F * F
    return _Point(
        delta, lam_h_, a2, m2, cos, F, Z, R, out=R + T,
        dW=(m / C) * R * F + lam_w * alpha * F,
        dH=alpha / (N * C) * F * R + lam_h_ * m * F,
        db=R.row_sum / C,
        loss=R.frob_sq / (2 * C) + lam_w / 2 * a2 * FF.trace + lam_h_ / 2 * m2 * N * FF.trace,
    )  # fmt: skip


def _stationarity(bias: bool, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    tag = "with bias" if bias else "no bias"
    P = _point(f, bias, "collapse")
    args, ls = (C, N, lam_w, P.lam_h), {"label_smoothing": A_LS}
    delta, a_ = P.delta, A_LS
    eps_ = f["eps"](*args, bias, **ls)
    claims = [
        zero(f"ufm_delta = (1 - a)/(1 + u) on the collapse side ({tag})", f["delta"](*args) - delta),
        positive(f"lam_w lam_h < ufm_collapse_bound(C, N, a) on the collapse side ({tag})",
                 f["collapse_bound"](C, N, **ls) - lam_w * P.lam_h),
        positive(f"ufm_w_row_norm_sq > 0 for delta < 1 - a ({tag})", P.a2),
        positive(f"ufm_h_norm_sq > 0 for delta < 1 - a ({tag})", P.m2),
        zero(f"frame rows are unit vectors ({tag})", (P.F * P.F).diag - 1),
        zero(f"frame cosine = ufm_cos_w ({tag})", (P.F * P.F).off - P.cos),
        zero(f"||W_c|| ||mu_c|| = ufm_norm_product ({tag})",
             _positive_root(P.a2 * P.m2) - f["norm_product"](*args, bias, **ls)),
        zero(f"W_c = ufm_w_scale mu_c ({tag})", _positive_root(P.a2 / P.m2) - f["w_scale"](N, lam_w, P.lam_h)),
        *(zero(f"stationarity dL/dW = 0 ({tag})", r) for r in P.dW.coefficients()),
        *(zero(f"stationarity dL/dH = 0 ({tag})", r) for r in P.dH.coefficients()),
        zero(f"L at the built point = ufm_loss ({tag})", P.loss - f["loss"](*args, bias, **ls)),
        zero(f"correct-class output = 1 - ufm_eps ({tag})", P.out.diag - (1 - eps_)),
        zero(f"wrong-class output = ufm_f_other ({tag})", P.out.off - f["f_other"](*args, bias, **ls)),
    ]  # fmt: skip
    if bias:
        claims += [
            zero("stationarity dL/db = R 1/C = 0 (with bias, lam_b = 0)", P.db),
            zero("ufm_cos_w = sqi_cosine(C) = -1/(C-1): a simplex ETF (with bias)",
                 P.cos - closed_form.sqi_cosine(C)),
            zero("mu_G = m F 1/C = 0: features centred (with bias)", P.F.row_sum),
            zero("ufm_eps = (C-1)(a + delta)/C (docs formula, with bias)", eps_ - (C - 1) * (a_ + delta) / C),
            zero("ufm_f_other = (a + delta)/C (docs formula, with bias)",
                 f["f_other"](*args, bias, **ls) - (a_ + delta) / C),
            zero("ufm_w_row_norm_sq = sqrt(lam_h N/lam_w)(1 - a - delta)(C-1)/C (docs formula, with bias)",
                 P.a2 - sympy.sqrt(P.lam_h * N / lam_w) * (1 - a_ - delta) * (C - 1) / C),
            zero("ufm_loss = (C-1)/C (delta(1-a) - delta^2/2) (docs formula, with bias)",
                 f["loss"](*args, bias, **ls) - (C - 1) / C * (delta * (1 - a_) - delta**2 / 2)),
        ]  # fmt: skip
    else:
        centred = P.m2 * P.F * IJ.centring(C) * P.F  # Gram of mu_c - mu_G = m P_perp F e_c
        claims += [
            zero("ufm_cos_w = a/((1-a-delta)(C-1) + 1 - delta) (docs formula, no bias)",
                 P.cos - a_ / ((1 - a_ - delta) * (C - 1) + 1 - delta)),
            positive("ufm_cos_w > 0: the rows lean towards the mean (no bias)", P.cos),
            zero("centred class means: cosine sqi_cosine(C) = -1/(C-1) (no bias)",
                 centred.off / centred.diag - closed_form.sqi_cosine(C)),
            zero("ufm_f_other = a/C, the wrong-class target (docs formula, no bias)",
                 f["f_other"](*args, bias, **ls) - a_ / C),
            zero("ufm_eps = ((C-1)(a + delta) + delta)/C (docs formula, no bias)",
                 eps_ - ((C - 1) * (a_ + delta) + delta) / C),
            zero("ufm_loss = (C-1)/C (delta(1-a) - delta^2/2) + (delta - delta^2/2)/C (docs formula, no bias)",
                 f["loss"](*args, bias, **ls)
                 - (C - 1) / C * (delta * (1 - a_) - delta**2 / 2) - (delta - delta**2 / 2) / C),
        ]  # fmt: skip
    return claims


@register(
    "label_smoothing_bias",
    "UFM minimizer with label smoothing a, with bias (simplex ETF): stationary point, symbolic C, N, lam_w, "
    "lam_h, a on delta < 1 - a; dL/dW = dL/dH = dL/db = 0 at the point built from ufm_w_row_norm_sq, "
    "ufm_h_norm_sq, ufm_cos_w, b = 1/C; its loss, outputs and norms are ufm_loss, ufm_eps, ufm_f_other, "
    "ufm_norm_product",
    "derived here (docs/theory.md §5.2, label smoothing)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w > 0; a = 1/(1+v), v > 0 (0 < a < 1); "
    "lam_h = delta^2/(C^2 N lam_w) with delta = (1-a)/(1+u), u > 0 (delta < 1 - a); lam_b = 0",
)
def label_smoothing_bias(rng: np.random.Generator, **formulas) -> list[Claim]:
    return _stationarity(True, **formulas)


@register(
    "label_smoothing_nobias",
    "UFM minimizer with label smoothing a, without bias (smoothed frame): stationary point, symbolic C, N, "
    "lam_w, lam_h, a on delta < 1 - a; dL/dW = dL/dH = 0 at the point built from the closed forms; its "
    "loss, outputs and cosine a/((1-a-delta)(C-1) + 1 - delta) are ufm_loss, ufm_eps, ufm_f_other, ufm_cos_w",
    "derived here (docs/theory.md §5.2, label smoothing)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w > 0; a = 1/(1+v), v > 0 (0 < a < 1); "
    "lam_h = delta^2/(C^2 N lam_w) with delta = (1-a)/(1+u), u > 0 (delta < 1 - a)",
)
def label_smoothing_nobias(rng: np.random.Generator, **formulas) -> list[Claim]:
    return _stationarity(False, **formulas)


@register(
    "label_smoothing_rank_one",
    "UFM minimizer with label smoothing a, without bias, rank one: stationary point, symbolic C, N, lam_w, "
    "lam_h, a on 1 - a < delta < 1; W rows equal, ||W_c||^2 = ufm_w_scale (1 - delta)/C, every output "
    "(1 - delta)/C, loss = ufm_rank_one_loss",
    "derived here (docs/theory.md §5.2, label smoothing)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w > 0; a = 1/(1+v), v > 0; "
    "lam_h = delta^2/(C^2 N lam_w) with delta = 1 - a/(1+w), w > 0 (1 - a < delta < 1)",
)
def label_smoothing_rank_one(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    P = _point(f, False, "rank_one")
    args = (C, N, lam_w, P.lam_h)
    return [
        zero("ufm_delta = 1 - a/(1 + w) on the rank-one side", f["delta"](*args) - P.delta),
        zero("delta = 1 - a/(1 + w) (parametrization)", P.delta - (1 - A_LS / (1 + w))),
        positive("delta > 1 - a: the centred modes are thresholded away", P.delta - (1 - A_LS)),
        positive("delta < 1: the mean mode survives", 1 - P.delta),
        positive("lam_w lam_h >= ufm_collapse_bound(C, N, a): no collapsed minimizer",
                 lam_w * P.lam_h - f["collapse_bound"](C, N, label_smoothing=A_LS)),
        zero("frame rows are unit vectors (rank one)", (P.F * P.F).diag - 1),
        zero("frame cosine = 1: all W rows coincide (rank one)", (P.F * P.F).off - 1),
        *(zero("stationarity dL/dW = 0 (rank one)", r) for r in P.dW.coefficients()),
        *(zero("stationarity dL/dH = 0 (rank one)", r) for r in P.dH.coefficients()),
        zero("every output = (1 - delta)/C (rank one)", P.out.off - (1 - P.delta) / C),
        zero("correct-class output = wrong-class output (rank one)", P.out.diag - P.out.off),
        zero("L at the built point = ufm_rank_one_loss",
             P.loss - f["rank_one_loss"](*args, label_smoothing=A_LS)),
        zero("ufm_rank_one_loss = (delta - delta^2/2)/C + (C-1)(1-a)^2/(2C) (docs formula)",
             f["rank_one_loss"](*args, label_smoothing=A_LS)
             - (P.delta - P.delta**2 / 2) / C - (C - 1) * (1 - A_LS) ** 2 / (2 * C)),
    ]  # fmt: skip


@register(
    "label_smoothing_global",
    "UFM with label smoothing a, global minimum: soft-threshold value identity, symbolic C, N, lam_w, lam_h, a: "
    "T = A Y has singular values sqrt(N)(1-a) (C-1 times) and sqrt(N); the minimal loss ufm_loss / "
    "ufm_rank_one_loss / ufm_zero_loss is the sum over them of g(sigma) = (delta sigma - delta^2/2)/C "
    "(sigma > delta) or sigma^2/(2C); at a = 0 it is (k/C)(delta - delta^2/2); the built minimizers attain "
    "the nuclear-norm bound with W H = the soft-thresholded targets (bias Pythagoras checked at "
    "(C, N) = (2, 1), (2, 2), (3, 1), (4, 1))",
    "derived here (docs/theory.md §5.1 steps 1-4, with label smoothing)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w, lam_h, a > 0 for the identities; the built points "
    "on a = 1/(1+v) and delta = (1-a)/(1+u) or 1 - a/(1+w) (u, v, w > 0)",
)
def label_smoothing_global(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    s, sigma = sympy.symbols("s sigma", positive=True)
    A = _targets(C, a)
    P_perp, P_1 = A.projectors
    TT = N * A * A  # T T^T = A Y Y^T A = N A^2
    args, ls = (C, N, lam_w, lam_h), {"label_smoothing": a}
    delta = f["delta"](*args)
    tau = sympy.sqrt(lam_w * lam_h)
    # step 4: one target singular value sqrt(N) sigma, kept as s >= 0
    g = (s - sympy.sqrt(N) * sigma) ** 2 / (2 * N * C) + tau * s
    s_star = sympy.solve(sympy.diff(g, s), s)[0]
    kept = sympy.simplify(g.subs(s, s_star))  # sigma > delta
    dropped = g.subs(s, 0)  # sigma <= delta

    def kept_(x):
        return kept.subs(sigma, x)

    def dropped_(x):
        return dropped.subs(sigma, x)

    claims = [
        *(zero("step 2: A = (1-a) I + (a/C) J = (1-a) P_perp + P_1", r)
          for r in (A - (1 - a) * P_perp - P_1).coefficients()),
        zero("step 2: T's singular values on 1^perp are sqrt(N)(1-a) (C-1 times)", TT.eig_perp - N * (1 - a) ** 2),
        zero("step 2: T's singular value on 1 is sqrt(N) (once)", TT.row_sum - N),
        zero("step 3 (bias): T's mean column is A 1 N/n = 1/C, so b = 1/C", A.row_sum / C - 1 / C),
        *(zero("step 3 (bias): centred targets T - (T 1/n) 1^T = A P_perp Y = (1-a) P_perp Y", r)
          for r in (A * P_perp - (1 - a) * P_perp).coefficients()),
        positive("step 4: g is strictly convex, g'' = 1/(NC) > 0", sympy.diff(g, s, 2)),
        zero("step 4: soft threshold s* = sqrt(N)(sigma - ufm_delta)", s_star - sympy.sqrt(N) * (sigma - delta)),
        zero("step 4: g'(0) NC/sqrt(N) = delta - sigma, so the mode is dropped iff delta >= sigma",
             sympy.diff(g, s).subs(s, 0) * N * C / sympy.sqrt(N) - (delta - sigma)),
        zero("step 4: kept mode costs g(s*) = (delta sigma - delta^2/2)/C", kept - (delta * sigma - delta**2 / 2) / C),
        zero("step 4: dropped mode costs g(0) = sigma^2/(2C)", dropped - sigma**2 / (2 * C)),
        zero("value identity (bias, delta < 1-a): ufm_loss = (C-1) g_kept(1-a)",
             f["loss"](*args, True, **ls) - (C - 1) * kept_(1 - a)),
        zero("value identity (no bias, delta < 1-a): ufm_loss = (C-1) g_kept(1-a) + g_kept(1)",
             f["loss"](*args, False, **ls) - (C - 1) * kept_(1 - a) - kept_(1)),
        zero("value identity (no bias, 1-a <= delta < 1): ufm_rank_one_loss = (C-1) g_dropped(1-a) + g_kept(1)",
             f["rank_one_loss"](*args, **ls) - (C - 1) * dropped_(1 - a) - kept_(1)),
        zero("value identity (bias, delta >= 1-a): ufm_zero_loss = (C-1) g_dropped(1-a)",
             f["zero_loss"](C, True, **ls) - (C - 1) * dropped_(1 - a)),
        zero("value identity (no bias, delta >= 1): ufm_zero_loss = (C-1) g_dropped(1-a) + g_dropped(1)",
             f["zero_loss"](C, False, **ls) - (C - 1) * dropped_(1 - a) - dropped_(1)),
    ]  # fmt: skip
    for bias, k_ in ((True, C - 1), (False, C)):
        tag = "with bias, k = C-1" if bias else "no bias, k = C"
        at0 = {"label_smoothing": 0}
        claims += [
            zero(f"a = 0: ufm_loss = (k/C)(delta - delta^2/2) ({tag})",
                 f["loss"](*args, bias, **ls).subs(a, 0) - k_ / C * (delta - delta**2 / 2)),
            zero(f"a = 0: ufm_loss(label_smoothing=a) -> ufm_loss(label_smoothing=0) ({tag})",
                 f["loss"](*args, bias, **ls).subs(a, 0) - f["loss"](*args, bias, **at0)),
            zero(f"a = 0: ufm_zero_loss = k/(2C) ({tag})", f["zero_loss"](C, bias, **ls).subs(a, 0) - k_ / (2 * C)),
            zero(f"a = 0: ufm_eps -> ufm_eps(label_smoothing=0) ({tag})",
                 f["eps"](*args, bias, **ls).subs(a, 0) - f["eps"](*args, bias, **at0)),
            zero(f"a = 0: ufm_eps = delta k/C ({tag})", f["eps"](*args, bias, **ls).subs(a, 0) - delta * k_ / C),
            zero(f"a = 0: ufm_cos_w = {'-1/(C-1)' if bias else '0'} ({tag})",
                 f["cos_w"](*args, bias, **ls).subs(a, 0) - (closed_form.sqi_cosine(C) if bias else 0)),
        ]  # fmt: skip
    for bias, regime, M in (
        (True, "collapse", lambda d: (1 - A_LS - d) * IJ.centring(C)),
        (False, "collapse", lambda d: _targets(C, A_LS) - d * IJ.identity(C)),
        (False, "rank_one", lambda d: (1 - d) * IJ.ones(C) / C),
    ):
        tag = f"{'with bias' if bias else 'no bias'}, {REGIME_TEXT[regime]}"
        P = _point(f, bias, regime)
        nuclear = sympy.sqrt(N) * ((C - 1) * P.Z.eig_perp + P.Z.row_sum)  # Z PSD: |eigenvalues| sum
        penalty = lam_w / 2 * P.a2 * (P.F * P.F).trace + P.lam_h / 2 * P.m2 * N * (P.F * P.F).trace
        claims += [
            *(zero(f"built point: W H = soft-thresholded targets M Y ({tag})", r)
              for r in (P.Z - M(P.delta)).coefficients()),
            zero(f"built point: penalty = sqrt(lam_w lam_h) ||W H||_*, the bound of step 1 is attained ({tag})",
                 penalty - sympy.sqrt(lam_w * P.lam_h) * nuclear),
        ]  # fmt: skip
    claims += bias_pythagoras(a, BIAS_SIZES, "step 3")
    return claims


@register(
    "label_smoothing_regimes",
    "UFM with label smoothing a, regime boundaries, symbolic C, N, lam_w, lam_h, a: the loss gaps are perfect "
    "squares, ufm_zero_loss - ufm_loss = (C-1)(1-a-delta)^2/(2C) (bias), ufm_rank_one_loss - ufm_loss = "
    "(C-1)(1-a-delta)^2/(2C) and ufm_zero_loss - ufm_rank_one_loss = (1-delta)^2/(2C) (no bias): positive "
    "inside each regime, zero on its boundary; delta < 1 - a iff lam_w lam_h < ufm_collapse_bound(C, N, a)",
    "derived here (docs/theory.md §5.2, label smoothing)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w, lam_h, a > 0 for the identities; the strict "
    "signs on a = 1/(1+v), delta = (1-a)/(1+u) or 1 - a/(1+w) (u, v, w > 0)",
)
def label_smoothing_regimes(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    args, ls = (C, N, lam_w, lam_h), {"label_smoothing": a}
    delta = f["delta"](*args)
    gap_bias = f["zero_loss"](C, True, **ls) - f["loss"](*args, True, **ls)
    gap_collapse = f["rank_one_loss"](*args, **ls) - f["loss"](*args, False, **ls)
    gap_rank_one = f["zero_loss"](C, False, **ls) - f["rank_one_loss"](*args, **ls)
    on = {regime: {a: A_LS, lam_h: _lam_h(d)} for regime, d in DELTA.items()}  # inside each regime
    # on each boundary (1 - a = v/(1+v) written as a product, so that sqrt(delta^2) = delta)
    edge = {"1 - a": {a: A_LS, lam_h: _lam_h(v / (1 + v))}, "1": {lam_h: _lam_h(1)}}
    return [
        zero("bias: ufm_zero_loss - ufm_loss = (C-1)(1-a-delta)^2/(2C), a perfect square",
             gap_bias - (C - 1) * (1 - a - delta) ** 2 / (2 * C)),
        zero("no bias: ufm_rank_one_loss - ufm_loss = (C-1)(1-a-delta)^2/(2C), a perfect square",
             gap_collapse - (C - 1) * (1 - a - delta) ** 2 / (2 * C)),
        zero("no bias: ufm_zero_loss - ufm_rank_one_loss = (1-delta)^2/(2C), a perfect square",
             gap_rank_one - (1 - delta) ** 2 / (2 * C)),
        positive("bias, delta < 1-a: ufm_loss < ufm_zero_loss", gap_bias.subs(on["collapse"])),
        positive("no bias, delta < 1-a: ufm_loss < ufm_rank_one_loss", gap_collapse.subs(on["collapse"])),
        positive("no bias, delta < 1-a: ufm_rank_one_loss < ufm_zero_loss", gap_rank_one.subs(on["collapse"])),
        positive("no bias, 1-a < delta < 1: ufm_rank_one_loss < ufm_zero_loss", gap_rank_one.subs(on["rank_one"])),
        positive("no bias, 1-a < delta < 1: the collapsed point does not exist, its kept value "
                 "sqrt(N)(1-a-delta) would be negative", (delta - (1 - a)).subs(on["rank_one"])),
        zero("continuity at delta = 1-a (bias): ufm_loss = ufm_zero_loss", gap_bias.subs(edge["1 - a"])),
        zero("continuity at delta = 1-a (no bias): ufm_loss = ufm_rank_one_loss", gap_collapse.subs(edge["1 - a"])),
        zero("continuity at delta = 1 (no bias): ufm_rank_one_loss = ufm_zero_loss", gap_rank_one.subs(edge["1"])),
        zero("threshold: ufm_collapse_bound(C, N, a) delta^2 = (1-a)^2 lam_w lam_h, so delta < 1-a iff "
             "lam_w lam_h < bound", f["collapse_bound"](C, N, **ls) * delta**2 - (1 - a) ** 2 * lam_w * lam_h),
        zero("threshold: ufm_collapse_bound(C, N) delta^2 = lam_w lam_h, so delta < 1 iff lam_w lam_h < bound "
             "(rank one, no bias)", f["collapse_bound"](C, N) * delta**2 - lam_w * lam_h),
    ]  # fmt: skip


@register(
    "label_smoothing_sqi",
    "UFM with label smoothing a, link to SQI, symbolic C, N, lam_w, lam_h, a on delta < 1 - a: the smoothed "
    "targets are SQI with eps = ufm_smoothing_eps = a(C-1)/C; with a bias the minimizer is SQI, wrong-class "
    "output eps/(C-1) with eps = ufm_smoothing_eps + (C-1)delta/C, and the theorem's NC3 and NC2 hold with "
    "eps - ufm_smoothing_eps in place of eps; without a bias SQI fails by delta/(C-1)",
    "derived here (docs/theory.md §4.3, §5.3; poster, main theorem)",
    "C = k + 1, k >= 1 integer; N positive integer; lam_w > 0; a = 1/(1+v), v > 0; "
    "lam_h = delta^2/(C^2 N lam_w) with delta = (1-a)/(1+u), u > 0 (delta < 1 - a)",
)
def label_smoothing_sqi(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    T = _targets(C, A_LS)
    eps_ls = f["smoothing_eps"](C, A_LS)
    claims = [
        zero("targets: correct-class target = 1 - ufm_smoothing_eps", T.diag - (1 - eps_ls)),
        zero("targets: wrong-class target = ufm_smoothing_eps/(C-1) (SQI)", T.off - eps_ls / (C - 1)),
        zero("ufm_smoothing_eps = a (C-1)/C", eps_ls - A_LS * (C - 1) / C),
    ]
    for bias in (True, False):
        P = _point(f, bias, "collapse")
        args, ls = (C, N, lam_w, P.lam_h), {"label_smoothing": A_LS}
        eps_ = f["eps"](*args, bias, **ls)
        if bias:
            excess = eps_ - eps_ls
            E = P.out - T  # residual outputs - targets: SQI-shaped with eps - eps_ls
            claims += [
                zero("with bias: built point's wrong-class output = ufm_eps/(C-1) (SQI)", P.out.off - eps_ / (C - 1)),
                zero("with bias: ufm_eps = ufm_smoothing_eps + (C-1) delta/C", eps_ - eps_ls - (C - 1) * P.delta / C),
                zero("with bias: residual on the correct class = -(eps - eps_ls)", E.diag + excess),
                zero("with bias: residual on a wrong class = (eps - eps_ls)/(C-1)", E.off - excess / (C - 1)),
                zero("with bias: NC3, alpha/m = sqi_w_scale(C, eps - eps_ls, lam_w)",
                     _positive_root(P.a2 / P.m2) - closed_form.sqi_w_scale(C, excess, lam_w)),
                zero("with bias: NC2 equinorm, ||W_c||^2 = (eps - eps_ls)((C-1)/C - eps)/(lam_w (C-1))",
                     P.a2 - excess * ((C - 1) / C - eps_) / (lam_w * (C - 1))),
                zero("with bias: this equinorm at eps_ls = 0 is the theorem's sqi_w_row_norm_sq(C, eps, lam_w)",
                     eps * ((C - 1) / C - eps) / (lam_w * (C - 1)) - closed_form.sqi_w_row_norm_sq(C, eps, lam_w)),
                zero("with bias: NC2 equiangularity, ufm_cos_w = sqi_cosine(C)", P.cos - closed_form.sqi_cosine(C)),
            ]  # fmt: skip
        else:
            claims.append(
                positive("no bias: SQI fails, ufm_eps/(C-1) - ufm_f_other = delta/(C-1) > 0",
                         eps_ / (C - 1) - f["f_other"](*args, bias, **ls))
            )  # fmt: skip
    return claims


def _numeric_cases():
    """(C, N, a, bias, regime, delta) for the numeric checks: every geometry of ufm_optimum."""
    for C_, N_ in NUMERIC_SIZES:
        for a_ in NUMERIC_SMOOTHING:
            for bias in (True, False):
                yield C_, N_, a_, bias, "collapse", 0.5 * (1 - a_)
                yield C_, N_, a_, bias, "zero", 1.3
                if not bias and a_ > 0:
                    yield C_, N_, a_, bias, "rank_one", 1 - a_ / 2


def _numeric_residual(f: dict, rng: np.random.Generator) -> float:
    """Worst relative disagreement between ufm_optimum's fields, its .build under ufm.model, and the
    closed forms, over the numeric cases."""
    worst = 0.0
    geometries = set()
    for C_, N_, a_, bias, regime, delta in _numeric_cases():
        for ratio in NUMERIC_RATIOS:
            product = (delta / C_) ** 2 / N_  # lam_w lam_h with ufm_delta = delta
            lw, lh = np.sqrt(product * ratio), np.sqrt(product / ratio)
            args, ls = (C_, N_, lw, lh), {"label_smoothing": a_}
            problem = UFMProblem(C_, N_, lam_w=lw, lam_h=lh, bias=bias, label_smoothing=a_)
            opt = closed_form.ufm_optimum(C_, N_, lw, lh, bias=bias, label_smoothing=a_)
            geometries.add(opt.geometry)
            if problem.loss.closed_form(problem) != opt:
                return float("inf")
            params = opt.build(C_ + 2, rng=rng)
            value, grad = loss_and_grad(problem, params)
            fout = outputs(problem, params)  # (C, n)
            idx = np.arange(problem.n)
            means = params.H @ problem.Y.T / N_  # (p, C) class means
            gram = params.W @ params.W.T  # (C, C)
            expect = {"delta": f["delta"](*args), "eps_label_smoothing": f["smoothing_eps"](C_, a_)}
            if regime == "collapse":
                expect |= {
                    "eps": f["eps"](*args, bias, **ls), "f_other": f["f_other"](*args, bias, **ls),
                    "w_row_norm_sq": f["w_row_norm_sq"](*args, bias, **ls),
                    "h_norm_sq": f["h_norm_sq"](*args, bias, **ls), "cos_w": f["cos_w"](*args, bias, **ls),
                    "loss": f["loss"](*args, bias, **ls), "lam_product_max": f["collapse_bound"](C_, N_, **ls),
                }  # fmt: skip
            elif regime == "rank_one":  # every output (1 - delta)/C; q = (1 - delta)/C split by w_scale
                q, scale = (1 - delta) / C_, f["w_scale"](N_, lw, lh)
                expect |= {
                    "eps": 1 - q, "f_other": q, "w_row_norm_sq": scale * q, "h_norm_sq": q / scale,
                    "cos_w": 1.0, "loss": f["rank_one_loss"](*args, **ls),
                }  # fmt: skip
            else:  # W = H = 0: outputs b = 1/C with a bias, 0 without
                f_out = 1 / C_ if bias else 0.0
                expect |= {
                    "eps": 1 - f_out, "f_other": f_out, "w_row_norm_sq": 0.0, "h_norm_sq": 0.0,
                    "loss": f["zero_loss"](C_, bias, **ls),
                }  # fmt: skip
            measured = {
                "eps": 1 - fout[problem.labels, idx].mean(), "f_other": fout[(problem.labels + 1) % C_, idx].mean(),
                "w_row_norm_sq": np.diag(gram).max(), "h_norm_sq": (means**2).sum(axis=0).max(),
                "loss": value,
            }  # fmt: skip
            if regime != "zero":
                measured["cos_w"] = gram[0, 1] / gram[0, 0]
            for name, want in expect.items():
                got = [getattr(opt, name)] + ([measured[name]] if name in measured else [])
                for x in got:
                    worst = max(worst, abs(float(x) - float(want)) / max(1.0, abs(float(want))))
            # (C-1, n): every wrong-class output, and (n,) every correct-class output, must be one number
            off = fout[(problem.labels[None, :] + np.arange(1, C_)[:, None]) % C_, idx]
            worst = max(worst, np.ptp(off), np.ptp(fout[problem.labels, idx]), np.abs(grad.ravel()).max())
    if geometries != set(DEPTH1_GEOMETRIES):
        return float("inf")
    return worst


@register(
    "label_smoothing_numeric",
    "UFM with label smoothing a: ufm_optimum(label_smoothing=a).build is a stationary point of "
    "ufm.model.loss_and_grad whose loss, outputs, norms and cosine equal the closed forms, every geometry "
    f"({', '.join(DEPTH1_GEOMETRIES)}), checked at (C, N) = {', '.join(map(str, NUMERIC_SIZES))}, "
    f"a = {', '.join(map(str, NUMERIC_SMOOTHING))}, lam_w/lam_h = {', '.join(map(str, NUMERIC_RATIOS))}",
    "derived here (docs/theory.md §5.2, label smoothing); float64 library code",
    "delta = (1-a)/2 (collapse), 1 - a/2 (rank one, no bias), 1.3 (zero); p = C + 2, random rotation",
)
def label_smoothing_numeric(rng: np.random.Generator, **overrides) -> list[Claim]:
    f = with_overrides(FORMULAS, overrides)
    return [
        numeric(
            "ufm_optimum fields, .build under ufm.model (gradient 0, loss, outputs, norms, cosine) and the "
            "closed forms agree",
            _numeric_residual(f, rng),
            REL_TOL,
        )
    ]
