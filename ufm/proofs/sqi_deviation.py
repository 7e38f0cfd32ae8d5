"""docs/theory.md §12: the theorem's prediction errors at any point, as exact identities and bounds.

The matrix identities are proved with ``MatrixSymbol``s of symbolic sizes (n examples, C classes, p
features): each is a polynomial identity in non-commuting matrices, decided by SymPy's expansion and
spot-checked at random sizes. The class-symmetric Gram matrices of the balanced one-hot targets live
in the I/J algebra for symbolic C. The inequalities of the bounds are Cauchy-Schwarz
(|<A, B>| <= ||A||_F ||B||_F, ||A B||_2 <= ||A||_2 ||B||_2 <= ||A||_F ||B||_2), the triangle
inequality, and two scalar facts whose algebra is checked here: the cosine perturbation lemma (§12.4)
and the normalization lemma (§12.2).
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form, sqi_deviation

from ._core import Claim, matrix_zero, numeric, positive, register, zero
from .algebra import IJ
from .symbols import C_GE2, C, N, lam

n_, p_ = sympy.symbols("n p", positive=True, integer=True)
e_, a_ = sympy.symbols("e a", positive=True)
T = sympy.MatrixSymbol("T", n_, C)  # targets (n, C)
F = sympy.MatrixSymbol("F", n_, C)  # outputs (n, C)
P = sympy.MatrixSymbol("P", n_, C)  # the SQI direction C/(C-1)(Y - 1 1^T/C)
H = sympy.MatrixSymbol("H", n_, p_)  # features (n, p)
W = sympy.MatrixSymbol("W", C, p_)  # last layer (C, p)
Mu = sympy.MatrixSymbol("Mu", C, p_)  # class means (C, p)
D = sympy.MatrixSymbol("d", n_, 1)  # 1 - F 1: each example's output-sum deficit

# ufm.sqi_deviation is checked at random points of these (C, N, p, a).
NUMERIC_CASES = ((2, 3, 4, 0.0), (4, 5, 6, 0.0), (5, 2, 8, 0.1))


def _gradient(W_, H_, T_, lam_):
    """dL/dW of L = 1/(2n)||H W^T - T||^2 + lam/2 ||W||^2 as a MatrixExpr (the definition, §12.1)."""
    return (H_ * W_.T - T_).T * H_ / n_ + lam_ * W_


@register(
    "sqi_identities",
    "Away from SQI and stationarity (any point, bias-free last layer, balanced): lam W = e/(C-1) M + "
    "E^T H/n + G and lam W W^T = K_pred + dK exactly, with K_pred = lam ||W_c||^2_pred C/(C-1)(I - J/C) "
    "(symbolic n, C, p matrices; symbolic C for the class-symmetric Gram terms)",
    "docs/theory.md §12.1-§12.3; derived here",
    "n, C, p, N positive integers, n = N C, C >= 2; lam, e, a > 0 with e = eps - a(C-1)/C; "
    "T = (1-a) Y + a/C J, P = C/(C-1)(Y - J/C), Y one-hot balanced; E = T - F - e P; F = H W^T",
)
def sqi_identities(rng: np.random.Generator, *, w_scale=closed_form.sqi_w_scale,
                   w_row_norm_sq=closed_form.sqi_w_row_norm_sq,
                   cosine=closed_form.sqi_cosine) -> list[Claim]:  # fmt: skip
    G = _gradient(W, H, T, lam)
    E = T - F - e_ * P
    R = T - F
    Q = sympy.Identity(C) - sympy.OneMatrix(C, C) / C
    # Balanced classes: Y^T H = N Mu and 1_n^T H = N 1_C^T Mu, so 1_C 1_n^T H = N J Mu.
    PtH = C / (C - 1) * (N * Mu - N * sympy.OneMatrix(C, C) * Mu / C)
    # P^T Y = N C/(C-1) (I - J/C) and P^T P = N (C/(C-1))^2 (I - J/C) from Y^T Y = N I, Y^T J = N J,
    # J^T J = N C J; P^T 1 = 0, so P^T T = (1 - a) P^T Y.
    Y_gram = IJ(C, N, 0)  # Y^T Y
    ones_y = IJ(C, 0, N)  # Y^T J_{n,C} = J^T Y
    ones_ones = IJ(C, 0, N * C)  # J^T J
    PtY = C / (C - 1) * (Y_gram - ones_y / C)
    PtP = (C / (C - 1)) ** 2 * (Y_gram - (ones_y + ones_y) / C + ones_ones / C**2)
    K_pred = e_ / (N * C) * ((1 - a_) * PtY - e_ * PtP)
    eps_of_e = e_ + closed_form.ufm_smoothing_eps(C, a_)
    k_pred = lam * w_row_norm_sq(C, eps_of_e, lam, a_)
    return [
        matrix_zero("§12.1: lam W = (1/n)(T - F)^T H + G at every point, F = H W^T", lam * W - (T - H * W.T).T * H / n_ - G),
        matrix_zero("§12.1: (T - F)^T H = e P^T H + E^T H", R.T * H - e_ * P.T * H - E.T * H),
        matrix_zero("§12.2: balanced P^T H = N C/(C-1) (Mu - 1 mu_G^T) = N C/(C-1) (I - J/C) Mu", PtH - N * C / (C - 1) * Q * Mu),
        zero(
            "§12.2: (e/n) N C/(C-1) = lam sqi_w_scale(C, eps, lam, a) at n = N C, so W = s M + (E^T H/n + G)/lam",
            e_ / (N * C) * N * C / (C - 1) - lam * w_scale(C, eps_of_e, lam, a_),
        ),
        matrix_zero(
            "§12.3: (1/n)(T - F)^T F = (e/n)(P^T T - e P^T P) + (1/n)(E^T T - e E^T P - e P^T E - E^T E)",
            R.T * (T - R) - (e_ * P.T * T - e_**2 * P.T * P) - (E.T * T - e_ * E.T * P - e_ * P.T * E - E.T * E),
        ),
        matrix_zero("§12.3: lam W W^T = (1/n)(T - F)^T F + G W^T, F = H W^T", lam * W * W.T - (T - H * W.T).T * (H * W.T) / n_ - G * W.T),
        *(zero("§12.3: P^T P = N (C/(C-1))^2 (I - J/C)", r) for r in (PtP - N * (C / (C - 1)) ** 2 * IJ.centring(C)).coefficients()),
        zero("§12.3: diag K_pred = lam sqi_w_row_norm_sq(C, eps, lam, a)", K_pred.diag - k_pred),
        zero("§12.3: off-diagonal/diagonal of K_pred = sqi_cosine(C)", K_pred.off / K_pred.diag - cosine(C)),
        *_numeric_claims(rng),
    ]  # fmt: skip


def _numeric_claims(rng: np.random.Generator) -> list[Claim]:
    """ufm.sqi_deviation at random points: the exact parts sum to the measured relative errors."""
    worst = 0.0
    for C_, N_, p_size, a in NUMERIC_CASES:
        labels = np.repeat(np.arange(C_), N_)
        H_ = rng.normal(size=(C_ * N_, p_size)) + 2.0
        W_ = rng.normal(size=(C_, p_size)) * 0.3
        b = sqi_deviation.sqi_bounds(W_, H_, labels, 0.05, label_smoothing=a)
        for measured, pred, parts in (
            (b.w_scale, b.w_scale_pred, b.w_scale_part_stationarity + b.w_scale_part_sqi),
            (
                b.w_row_norm_sq,
                b.w_row_norm_sq_pred,
                b.w_row_norm_sq_part_stationarity + b.w_row_norm_sq_part_sqi,
            ),
        ):
            worst = max(worst, abs((measured - pred) / pred - parts))
    return [numeric("ufm.sqi_deviation: the stationarity and SQI parts sum to the relative errors", worst)]


@register(
    "sqi_bound_steps",
    "The scalar steps of the §12 bounds: |cos - (-1/(C-1))| <= r C/(C-1)/(1 - r) for Gram entries moved "
    "by at most r of the diagonal, r < 1 (symbolic C, r); ||a/|a| - b/|b||| <= 2|a - b|/|a| (the "
    "algebraic identity; the rest is the triangle inequality); the output-sum deficit d of a critical "
    "bias-free last layer solves (I + H H^T/(n lam)) d = 1 (symbolic n, C, p)",
    "docs/theory.md §12.2, §12.4, §12.5; derived here",
    "C >= 2 integer (C = k + 1); r = 1/(1 + w) in (0, 1), w > 0; u, v, delta in [-r, r]; lam > 0; "
    "rows of T sum to 1",
)
def sqi_bound_steps(rng: np.random.Generator) -> list[Claim]:
    w = sympy.Symbol("w", positive=True)
    r = 1 / (1 + w)
    x = -1 / (C_GE2 - 1)  # the predicted cosine
    # q = 1/sqrt((1+u)(1+v)) lies in [1/(1+r), 1/(1-r)], so |q - 1| <= max(r/(1+r), r/(1-r)) = r/(1-r),
    # and |(x + delta) q - x| <= |x| |q - 1| + |delta| q <= (|x| + 1) r/(1-r).
    q_dev = r / (1 - r)
    bound = (-x + 1) * q_dev
    na, nb = sympy.symbols("n_a n_b", positive=True)  # |a|, |b|
    a_vec, b_vec = sympy.MatrixSymbol("a", p_, 1), sympy.MatrixSymbol("b", p_, 1)
    G = sympy.MatrixSymbol("G", C, p_)
    ones_C, ones_n = sympy.OneMatrix(C, 1), sympy.OneMatrix(n_, 1)
    # (T - F) 1 = d: lam W^T 1 = H^T d/n + G^T 1, so F 1 = H W^T 1 = (H H^T d/n + H G^T 1)/lam.
    F_ones = (H * H.T * D / n_ + H * G.T * ones_C) / lam
    return [
        zero("§12.4: 1/(1 - r) - 1 = r/(1 - r)", 1 / (1 - r) - 1 - q_dev),
        positive("§12.4: r/(1 - r) >= 1 - 1/(1 + r) (the lower side is the smaller deviation)", q_dev - (1 - 1 / (1 + r))),
        positive("§12.4: r/(1 - r) > 0 for r in (0, 1)", q_dev),
        zero(
            "§12.4: the mean cosine moves by at most C r/(1 - r) relative to |-1/(C-1)| (w_cos_bound of ufm.sqi_deviation)",
            bound / (-x) - C_GE2 * r / (1 - r),
        ),
        matrix_zero(
            "§12.2: a/|a| - b/|b| = (a - b)/|a| + b (|b| - |a|)/(|a||b|), each part at most |a - b|/|a|",
            a_vec / na - b_vec / nb - ((a_vec - b_vec) / na + b_vec * (nb - na) / (na * nb)),
        ),
        matrix_zero(
            "§12.5: d = 1 - F 1 gives (I + H H^T/(n lam)) d = 1 - H G^T 1/lam, so at G = 0 d != 0",
            (sympy.Identity(n_) + H * H.T / (n_ * lam)) * D - (ones_n - H * G.T * ones_C / lam) - (D - (ones_n - F_ones)),
        ),
    ]  # fmt: skip
