"""Poster, Lemma 1 (lam = 0): neural-collapse solutions never interpolate.

With H = M Y (NC1, mu_G = 0) and W M = alpha C/(C-1) (I - J/C) (NC2, NC3), the residual is
W M Y - Y = (W M - I) Y, and Y Y^T = N I gives ||(W M - I) Y||_F^2 = N ||W M - I||_F^2, an identity in
the I/J algebra. Positivity for every alpha has a sum-of-squares certificate:

    L(alpha) = 1/(2C) + C/(2(C-1)) (alpha - alpha*)^2,   alpha* = (C-1)/C.
"""

from __future__ import annotations

import numpy as np
import sympy

from ufm import closed_form, geometry
from ufm.model import UFMParams, UFMProblem
from ufm.model import loss as model_loss

from ._core import Claim, numeric, positive, register, zero
from .algebra import IJ
from .symbols import C_GE2, C, N, alpha

# Numeric check: ufm.model's loss at a collapsed configuration, for these (C, N) and random alpha.
LEMMA1_SIZES = ((2, 1), (3, 2), (5, 3), (8, 2))


@register(
    "lemma1",
    "Lemma 1: collapsed W M = alpha C/(C-1)(I - J/C), H = M Y give L = 1/2((1-alpha)^2 + alpha^2/(C-1)) "
    ">= 1/(2C) > 0, minimized at alpha* = (C-1)/C (symbolic C, N, alpha)",
    "poster, Lemma 1",
    "C, N positive integers, C >= 2 (C = k + 1 for signs); alpha real; lam = 0; mu_G = 0",
)
def lemma1(rng: np.random.Generator, *, loss=closed_form.lemma1_loss,
           alpha_star=closed_form.lemma1_alpha_star) -> list[Claim]:  # fmt: skip
    WM = alpha * C / (C - 1) * IJ.centring(C)
    # Lemma 1: L = 1/(2NC) ||W M Y - Y||_F^2 = N ||W M - I||_F^2 / (2NC)
    direct = N * (WM - IJ.identity(C)).frob_sq / (2 * N * C)
    a_star = alpha_star(C)
    certificate = loss(C, alpha) - 1 / (2 * C) - C / (2 * (C - 1)) * (alpha - a_star) ** 2
    claims = [
        zero("Lemma 1: 1/(2NC)||W M Y - Y||^2 = lemma1_loss(C, alpha)", direct, loss(C, alpha)),
        zero(
            "derived here: d lemma1_loss/d alpha = 0 at lemma1_alpha_star",
            sympy.diff(loss(C, alpha), alpha).subs(alpha, a_star),
        ),
        zero("derived here: L(alpha*) = 1/(2C)", loss(C, a_star), 1 / (2 * C)),
        zero(
            "Lemma 1 (> 0): L(alpha) = 1/(2C) + C/(2(C-1))(alpha - alpha*)^2 for every real alpha",
            certificate,
        ),
        positive("Lemma 1 (> 0): the certificate's weight C/(2(C-1)) is positive", C_GE2 / (2 * (C_GE2 - 1))),
        positive("Lemma 1 (> 0): the minimal loss 1/(2C) is positive", loss(C_GE2, alpha_star(C_GE2))),
    ]
    # ufm.model's loss at the collapsed point W = alpha E, H = E^T Y (E the simplex ETF rows).
    worst = 0.0
    for C_, N_ in LEMMA1_SIZES:
        a = float(rng.normal())
        problem = UFMProblem(C_, N_, lam_w=0.0, lam_h=0.0, bias=False)
        E = geometry.simplex_etf(C_, C_ + 1, rng=rng)  # (C, p): E E^T = C/(C-1)(I - J/C)
        params = UFMParams(E[problem.labels].T, (a * E,), None)
        worst = max(worst, abs(model_loss(problem, params) - float(loss(C_, a))))
    claims.append(numeric("Lemma 1: ufm.model loss at collapsed points = lemma1_loss", worst))
    return claims
