"""Poster, main theorem: SQI critical points of the regularized square loss satisfy NC1-NC4.

Setting (docs/theory.md §4): balanced classes, lam > 0, f = W h with W = W_L (C, p) and h the last-layer
features; symmetric quasi-interpolation (SQI) says every example of class c' has outputs
O e_c', with O = (1 - eps) on the diagonal and eps/(C-1) off it, so

    F = O Y,   F - Y = E Y with E = O - I,   W M_raw = O,   M_c = M_raw (I - J/C),

where M_raw (p, C) stacks the class means mu_c and M_c the centred ones mu_c - mu_G. All of O, E and
I - J/C lie in the I/J algebra, so for every C:

* NC3: dL/dW = 1/(NC) E Y H^T + lam W = 0 and Y H^T = N M_raw^T give W = -1/(C lam) E M_raw^T, which
  must equal s M_c^T = s (I - J/C) M_raw^T with s = sqi_w_scale.
* NC2: W W^T = s W M_c = s O (I - J/C): its diagonal is the equinorm, off/diag the cosine.
* NC4: W mu_G = O 1/C is constant over classes (row sums of O are 1), so M_c^T mu_G is too; with equal
  norms ||mu_c - mu_G|| this makes ||h - mu_c||^2 = const - (2/s) <W_c, h>, and s > 0.
* NC1 needs the features' own stationarity: in the UFM reading (h free, decay lam_h > 0),
  dL/dH = 1/(NC) W^T E Y + lam_h H = 0 gives H = A Y, so each feature is its class mean. The poster's
  sentence for deep networks ("f(x_n(c)) does not depend on n") is a sketch; this is what is checked.
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form
from ufm.model import UFMProblem, outputs

from ._core import Claim, numeric, positive, register, zero
from .algebra import IJ
from .symbols import C_GE2, C, eps, k, lam, lam_h, u

# NC1 is checked on explicit matrices at these sizes (C classes, N examples per class, p = C).
NC1_SIZES = tuple((C_, N_) for C_ in range(2, 6) for N_ in (1, 2, 3))
# Numeric checks use the UFM's global minimizer (an SQI critical point, with bias) at these sizes.
THEOREM_CASES = ((2, 3), (3, 2), (5, 4), (8, 1))
# Random features for the NC4 check.
NC4_SAMPLES = 200


def sqi_output_matrix(C_: object, eps_: object, outputs_=closed_form.sqi_outputs) -> IJ:
    """O = (f_correct - f_other) I + f_other J: column c' holds the outputs on class c' (poster, SQI)."""
    f_correct, f_other = outputs_(C_, eps_)
    return IJ(C_, f_correct - f_other, f_other)


def _sqi_minimizer(C_: int, N_: int, rng: np.random.Generator):
    """The UFM's global minimizer with bias, lam_w = lam_h, at a random point on the collapse side."""
    lam_ = float(rng.uniform(0.1, 0.9)) * np.sqrt(float(closed_form.ufm_collapse_bound(C_, N_)))
    problem = UFMProblem(C_, N_, lam_w=lam_, lam_h=lam_)
    params = closed_form.ufm_optimum(C_, N_, lam_, lam_).build(C_ + 1, rng=rng)
    f = outputs(problem, params)
    eps_ = 1.0 - float(f[problem.labels, np.arange(problem.n)].mean())  # measured SQI eps
    means = params.H @ problem.Y.T / N_  # (p, C) class means
    centred = means - means.mean(axis=1, keepdims=True)
    return problem, params, lam_, eps_, means, centred


@register(
    "theorem_nc3_nc2",
    "Theorem (NC3, NC2): under SQI, dL/dW_L = 0 gives W_L^c = eps/(lam(C-1))(mu_c - mu_G), "
    "||W_L^c||^2 = (eps - C eps^2/(C-1))/(C lam) and cosine -1/(C-1) (symbolic C, eps, lam; "
    "the UFM minimizer measured at C = 2, 3, 5, 8)",
    "poster, main theorem",
    "C >= 2 integer (C = k + 1 for signs), eps in (0, (C-1)/C) (eps = (C-1)/(C(1+u)), u > 0), lam > 0; balanced",
)
def theorem_nc3_nc2(rng: np.random.Generator, *, scale=closed_form.sqi_w_scale, norm_sq=closed_form.sqi_w_row_norm_sq,
                    cosine=closed_form.sqi_cosine, outputs_=closed_form.sqi_outputs) -> list[Claim]:  # fmt: skip
    O = sqi_output_matrix(C, eps, outputs_)
    E = O - IJ.identity(C)
    P = IJ.centring(C)
    s = scale(C, eps, lam)
    G_W = s * O * P  # W W^T = s W M_c = s W M_raw (I - J/C) = s O (I - J/C)
    claims = [
        zero("SQI: each example's outputs sum to 1 (columns of O)", O.row_sum, 1),
        *(zero("Theorem NC3: -1/(C lam)(O - I) = sqi_w_scale (I - J/C), i.e. W^T = s M_c", r)
          for r in (-E / (C * lam) - s * P).coefficients()),
        zero("Theorem NC2 (equinorm): diag(W W^T) = sqi_w_row_norm_sq", G_W.diag, norm_sq(C, eps, lam)),
        zero("Theorem NC2 (equiangularity): off/diag of W W^T = sqi_cosine", G_W.off / G_W.diag, cosine(C)),
    ]  # fmt: skip
    # Signs on the theorem's range: C >= 2, 0 < eps < (C-1)/C.
    eps_in_range = k / ((k + 1) * (1 + u))
    claims += [
        positive("Theorem NC3: the scale s is positive", scale(C_GE2, eps_in_range, lam)),
        positive(
            "Theorem NC2: the norm is positive for 0 < eps < (C-1)/C", norm_sq(C_GE2, eps_in_range, lam)
        ),
    ]
    # The UFM's global minimizer with bias is an SQI critical point: measure it.
    worst = 0.0
    for C_, N_ in THEOREM_CASES:
        _, params, lam_, eps_, _, centred = _sqi_minimizer(C_, N_, rng)
        W = params.W  # (C, p)
        gram = W @ W.T
        norms = np.diag(gram)
        cos = gram / np.sqrt(np.outer(norms, norms))
        off = cos[~np.eye(C_, dtype=bool)]
        worst = max(
            worst,
            np.abs(W - float(scale(C_, eps_, lam_)) * centred.T).max(),
            np.abs(norms - float(norm_sq(C_, eps_, lam_))).max(),
            np.abs(off - float(cosine(C_))).max(),
        )
    claims.append(
        numeric("Theorem NC2/NC3: the UFM minimizer's W (scale, norms, cosines) at C = 2, 3, 5, 8", worst)
    )
    return claims


@register(
    "theorem_nc1",
    "Theorem (NC1): at a critical point with SQI outputs, dL/dH = 0 makes every feature its class mean, "
    "Sigma_W = 0 (UFM reading, features free with decay lam_h > 0; explicit symbolic W at C = 2..5, N = 1..3)",
    "poster, main theorem (NC1); the UFM of docs/theory.md §0.1",
    "W symbolic (C x C), eps, lam_h > 0; SQI outputs F = O Y",
)
def theorem_nc1(rng: np.random.Generator, *, outputs_=closed_form.sqi_outputs) -> list[Claim]:
    claims = []
    for C_, N_ in NC1_SIZES:
        n = C_ * N_
        Y = sympy.Matrix(C_, n, lambda c, i, N_=N_: 1 if i // N_ == c else 0)  # one-hot, class-major
        W = sympy.Matrix(C_, C_, lambda i, j: sympy.Symbol(f"w_{i}{j}", real=True))
        E = sqi_output_matrix(C_, eps, outputs_).matrix(C_) - sympy.eye(C_)  # F - Y = E Y
        H = -(W.T * E * Y) / (n * lam_h)  # dL/dH = 1/n W^T (F - Y) + lam_h H = 0
        means = H * Y.T / N_  # (p, C)
        spread = H - means * Y  # h_n(c) - mu_c, (p, n)
        sigma_w = spread * spread.T / n
        claims.append(
            zero(f"Theorem NC1: Sigma_W = 0 at C = {C_}, N = {N_}", sum(sympy.Abs(x) for x in sigma_w))
        )
    return claims


@register(
    "theorem_nc4",
    "Theorem (NC4): under SQI and NC2-NC3, argmax_c <W_L^c, h> = argmin_c ||h - mu_c|| "
    "(symbolic C, eps, lam; the UFM minimizer on random features at C = 2, 3, 5, 8)",
    "poster, main theorem (NC4)",
    "C >= 2 integer, eps in (0, (C-1)/C), lam > 0; W^T = s M_c with s = sqi_w_scale",
)
def theorem_nc4(rng: np.random.Generator, *, scale=closed_form.sqi_w_scale,
                outputs_=closed_form.sqi_outputs) -> list[Claim]:  # fmt: skip
    O = sqi_output_matrix(C, eps, outputs_)
    # ||h - mu_c||^2 = ||h||^2 - 2<h, mu_G> + ||mu_G||^2 + ||d_c||^2 + 2<d_c, mu_G> - (2/s)<W_c, h>, d_c = mu_c - mu_G:
    # the c-dependent constants are ||d_c||^2 (equal by NC2: M_c^T M_c = W W^T / s^2 lies in the I/J
    # algebra) and <d_c, mu_G> = (W mu_G)_c / s = (O 1)_c / (C s).
    claims = [
        zero("Theorem NC4: W mu_G = O 1/C = 1/C 1 is the same for every class", O.row_sum / C, 1 / C),
        positive("Theorem NC4: s > 0, so the smallest distance is the largest <W_c, h>",
                 scale(C_GE2, k / ((k + 1) * (1 + u)), lam)),
    ]  # fmt: skip
    disagree = 0
    for C_, N_ in THEOREM_CASES:
        problem, params, _, _, means, _ = _sqi_minimizer(C_, N_, rng)
        h = rng.standard_normal((params.p, NC4_SAMPLES)) * np.linalg.norm(means, axis=0).max()
        by_classifier = np.argmax(params.W @ h + params.b[:, None], axis=0)
        by_centre = np.argmin(((h[:, None, :] - means[:, :, None]) ** 2).sum(axis=0), axis=0)
        disagree += int(np.sum(by_classifier != by_centre))
    claims.append(
        numeric(
            "Theorem NC4: classifier and nearest centre agree on random features (UFM minimizer)", disagree
        )
    )
    return claims
