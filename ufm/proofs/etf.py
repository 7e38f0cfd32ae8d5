"""docs/theory.md §1: the simplex equiangular tight frame, for every C at once.

For P (p x C) with orthonormal columns, the frame is E = sqrt(C/(C-1)) P (I - J/C). Its Gram matrix is
E^T E = C/(C-1) (I - J/C) P^T P (I - J/C) = C/(C-1) (I - J/C)^2, which lies in the I/J algebra, so
unit norms, the Gram matrix, the cosines and the rank are identities in the symbol C.
"""

from __future__ import annotations

import numpy as np

from ufm import closed_form, geometry

from ._core import Claim, numeric, positive, register, zero
from .algebra import IJ
from .symbols import C_GE2, C

# simplex_etf is checked numerically for these sizes (C classes, in p = C-1 and p = C+2 dimensions).
ETF_SIZES = range(2, 13)


def etf_gram(C_: object) -> IJ:
    """Gram matrix E^T E = C/(C-1) (I - J/C)^2 of the simplex ETF, in the I/J algebra."""
    P = IJ.centring(C_)
    return C_ / (C_ - 1) * (P * P)


@register(
    "etf",
    "Simplex ETF: unit norms, Gram C/(C-1)(I - J/C), cosine -1/(C-1), rank C-1 (symbolic C); "
    "ufm.geometry.simplex_etf and frame_gram checked numerically for C = 2..12",
    "docs/theory.md §1; poster NC2",
    "C positive integer, C >= 2 (C = k + 1, k positive integer, for signs); P^T P = I",
)
def etf(rng: np.random.Generator, *, cosine=closed_form.sqi_cosine, simplex=geometry.simplex_etf,
        gram=geometry.frame_gram) -> list[Claim]:  # fmt: skip
    P = IJ.centring(C)
    G = etf_gram(C)
    target = C / (C - 1) * P
    claims = [
        *(zero("I - J/C is a projector: (I - J/C)^2 = I - J/C", r) for r in (P * P - P).coefficients()),
        zero("§1: unit columns, diag(E^T E) = 1", G.diag, 1),
        *(zero("§1: Gram E^T E = C/(C-1)(I - J/C)", r) for r in (G - target).coefficients()),
        zero("§1: cosine of distinct columns = sqi_cosine(C) = -1/(C-1)", G.off / G.diag, cosine(C)),
        zero("§1: columns sum to zero (E 1 = 0)", P.row_sum),
        # Eigenvalue C/(C-1) on 1^perp (C-1 times) and 0 on 1: rank C-1, so E fits in any p >= C-1.
        positive("§1: rank C-1, eigenvalue on 1^perp is C/(C-1) > 0", etf_gram(C_GE2).eig_perp),
        zero("§1: rank C-1, eigenvalue on 1 is 0", G.row_sum),
    ]
    # The library's numeric frames: rows of unit norm, summing to zero, with the Gram matrix above.
    worst_rows, worst_gram = 0.0, 0.0
    for C_ in ETF_SIZES:
        expected = np.full((C_, C_), float(cosine(C_))) + (1 - float(cosine(C_))) * np.eye(C_)
        for p in (C_ - 1, C_ + 2):
            E = simplex(C_, p, rng=rng)  # (C, p) rows
            worst_rows = max(worst_rows, np.abs(E.sum(axis=0)).max())
            worst_gram = max(worst_gram, np.abs(E @ E.T - expected).max())
        worst_gram = max(worst_gram, np.abs(gram(C_) - expected).max())
    claims += [
        numeric("ufm.geometry.simplex_etf: rows sum to zero, C = 2..12", worst_rows),
        numeric(
            "ufm.geometry.simplex_etf and frame_gram: Gram = unit diagonal, off-diagonal cosine(C)",
            worst_gram,
        ),
    ]
    return claims
