"""Closed forms: the poster's theorem, Lemma 1, and the global minimizer of the regularized UFM.

Every formula here is written once and evaluates on NumPy numbers and on SymPy symbols alike, so
``proofs/`` checks the very expressions the library computes.

Global minimizer of the regularized UFM (derived here; THEORY.md statement 5)
-----------------------------------------------------------------------------
Square loss, balanced classes, depth 1, ``L = 1/(2n)||W H + b 1^T - Y||^2 + lam_w/2||W||^2 + lam_h/2||H||^2``,
n = N C, bias unregularized (lam_b = 0) or absent.

1. For fixed product Z = W H with p >= rank Z,
   ``min {lam_w/2 ||W||^2 + lam_h/2 ||H||^2 : W H = Z} = sqrt(lam_w lam_h) ||Z||_*``
   (AM-GM on the balanced factorization W = c U S^{1/2}, H = c^{-1} S^{1/2} V^T).
2. With a free bias, b = (Y - Z) 1 / n; the feature mean enters only through b and costs ||H||^2,
   so it is zero, b = 1/C and the targets become the centred Y~ = Y - 11^T/C, whose nonzero
   singular values are sqrt(N), C-1 times. Without a bias the targets are Y: sqrt(N), C times.
3. ``min_Z 1/(2n)||Z - T||^2 + tau ||Z||_*`` is singular-value soft thresholding at n tau, so every
   singular value of T becomes sqrt(N) - N C sqrt(lam_w lam_h) = sqrt(N)(1 - delta) with

       delta = C sqrt(N lam_w lam_h),

   and Z = (1 - delta) T when delta < 1 (collapse), Z = 0 otherwise (the zero solution). Collapse
   happens exactly when N C^2 lam_w lam_h < 1.

Consequences (k = C-1 with a bias, k = C without; "with bias" in brackets):

* outputs: correct class 1 - delta (C-1)/C [with bias] or 1 - delta [no bias]; wrong class delta/C
  [with bias] or 0 [no bias]. Hence eps = (C-1) sqrt(N lam_w lam_h) with a bias (symmetric
  quasi-interpolation, f_other = eps/(C-1)), and eps = delta without.
* geometry: W W^T and the class-mean Gram are proportional to I - 11^T/C (simplex ETF, cosine
  -1/(C-1)) with a bias, to I (orthogonal frame, cosine 0) without.
* ||W_c||^2 = sqrt(lam_h N/lam_w) (1 - delta) k/C,  ||mu_c||^2 = sqrt(lam_w/(lam_h N)) (1 - delta) k/C,
  and W_c = delta/(C lam_w) mu_c. With a bias mu_G = 0 and this is the theorem's NC3 scale
  eps/(lam (C-1)); without one the centred means mu_c - mu_G still form a simplex ETF.
* minimal loss: (k/C)(delta - delta^2/2) for delta < 1, k/(2C) at and above the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._validation import check_classes, check_nonneg, check_positive_int
from .geometry import orthogonal_frame, simplex_etf
from .model import UFMParams


def _is_symbolic(*xs: Any) -> bool:
    return any(type(x).__module__.startswith("sympy") for x in xs)


def _sqrt(x: Any) -> Any:
    """sqrt for NumPy numbers and SymPy expressions alike."""
    if _is_symbolic(x):
        import sympy

        return sympy.sqrt(x)
    return np.sqrt(x)


def _one(*xs: Any) -> Any:
    """The number 1 of the right kind, so that 1/(C-1) stays exact for SymPy integers."""
    if _is_symbolic(*xs):
        import sympy

        return sympy.Integer(1)
    return 1.0


# ---------------------------------------------------------------------------------------------
# Poster, theorem: critical points of gradient flow under symmetric quasi-interpolation (SQI).


def sqi_w_scale(C: Any, eps: Any, lam: Any) -> Any:
    """NC3 scale: W_L^c = eps/(lam (C-1)) (mu_c - mu_G) (poster, theorem, from dW_L^c/dt = 0)."""
    return eps / (lam * (C - 1))


def sqi_w_row_norm_sq(C: Any, eps: Any, lam: Any) -> Any:
    """NC2 equinorm: ||W_L^c||^2 = (eps - C eps^2/(C-1)) / (C lam) (poster, theorem)."""
    return (eps - C * eps**2 / (C - 1)) / (C * lam)


def sqi_cosine(C: Any) -> Any:
    """NC2 equiangularity: cos(W_L^c, W_L^c') = -1/(C-1) for c != c' (poster, theorem)."""
    return -_one(C) / (C - 1)


def sqi_outputs(C: Any, eps: Any) -> tuple[Any, Any]:
    """SQI outputs (correct class, wrong class) = (1 - eps, eps/(C-1)) (poster, assumption)."""
    return 1 - eps, eps / (C - 1)


# ---------------------------------------------------------------------------------------------
# Poster, Lemma 1: with lam = 0, collapsed solutions W M = alpha C/(C-1)(I - 11^T/C) do not interpolate.


def lemma1_loss(C: Any, alpha: Any) -> Any:
    """L = 1/2 ((1 - alpha)^2 + alpha^2/(C-1)) (poster, Lemma 1)."""
    return ((1 - alpha) ** 2 + alpha**2 / (C - 1)) / 2


def lemma1_alpha_star(C: Any) -> Any:
    """Minimizer of Lemma 1's loss over alpha: (C-1)/C, where L = 1/(2C) > 0 (derived here)."""
    return (C - 1) * _one(C) / C


# ---------------------------------------------------------------------------------------------
# Global minimizer of the regularized UFM (module docstring; derived here).


def ufm_delta(C: Any, N: Any, lam_w: Any, lam_h: Any) -> Any:
    """Soft-threshold ratio delta = C sqrt(N lam_w lam_h); collapse iff delta < 1."""
    return C * _sqrt(N * lam_w * lam_h)


def ufm_collapse_bound(C: Any, N: Any) -> Any:
    """Largest lam_w * lam_h with a nonzero minimizer: 1/(N C^2) (collapse iff lam_w lam_h < this)."""
    return _one(C, N) / (N * C**2)


def ufm_eps(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """eps = 1 - correct-class output: (C-1) sqrt(N lam_w lam_h) with a bias, delta without (delta < 1)."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    return delta * (C - 1) / C if bias else delta


def ufm_f_other(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """Output on a wrong class: delta/C = eps/(C-1) with a bias, 0 without (delta < 1)."""
    return ufm_delta(C, N, lam_w, lam_h) / C if bias else 0 * C


def _rank_fraction(C: Any, bias: bool) -> Any:
    """k/C with k = rank of the targets: C-1 (centred, with a bias) or C (no bias)."""
    return (C - 1) * _one(C) / C if bias else _one(C)


def ufm_w_scale(N: Any, lam_w: Any, lam_h: Any) -> Any:
    """s in W_c = s mu_c at the global minimizer: sqrt(lam_h N / lam_w) = delta/(C lam_w)."""
    return _sqrt(lam_h * N / lam_w)


def ufm_norm_product(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """||W_c|| ||mu_c|| = (1 - delta) k/C: the thresholded singular value sqrt(N)(1 - delta) shared
    between W and H, per class (delta < 1)."""
    return (1 - ufm_delta(C, N, lam_w, lam_h)) * _rank_fraction(C, bias)


def ufm_w_row_norm_sq(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """||W_c||^2 = sqrt(lam_h N / lam_w) (1 - delta) k/C at the global minimizer (delta < 1)."""
    return ufm_w_scale(N, lam_w, lam_h) * ufm_norm_product(C, N, lam_w, lam_h, bias)


def ufm_h_norm_sq(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """||mu_c||^2 = ||h_i||^2 = sqrt(lam_w / (lam_h N)) (1 - delta) k/C (delta < 1)."""
    return ufm_norm_product(C, N, lam_w, lam_h, bias) / ufm_w_scale(N, lam_w, lam_h)


def ufm_loss(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True) -> Any:
    """Minimal loss (k/C)(delta - delta^2/2) on the collapse side (delta < 1)."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    return _rank_fraction(C, bias) * (delta - delta**2 / 2)


def ufm_zero_loss(C: Any, bias: bool = True) -> Any:
    """Loss of the zero solution W = H = 0 (b = 1/C with a bias): k/(2C)."""
    return _rank_fraction(C, bias) / 2


GEOMETRIES = ("simplex_etf", "orthogonal_frame", "zero")


@dataclass(frozen=True)
class UFMOptimum:
    """Global minimizer of the regularized square-loss UFM (module docstring).

    Attributes
    ----------
    C, N, lam_w, lam_h, bias : the problem (bias unregularized when present).
    delta : C sqrt(N lam_w lam_h); the minimizer is nonzero iff delta < 1.
    eps : 1 minus the output on the correct class.
    f_correct, f_other : outputs on the correct and on a wrong class.
    w_row_norm_sq : ||W_c||^2 of every classifier row.
    h_norm_sq : ||mu_c||^2 of every class mean (= ||h_i||^2: features are collapsed). With a bias
        mu_G = 0, so this is also ||mu_c - mu_G||^2; without one ||mu_c - mu_G||^2 = h_norm_sq (1 - 1/C).
    cos_w : cosine between two distinct classifier rows: -1/(C-1) (ETF) or 0 (orthogonal frame).
    cos_h : cosine between two distinct centred class means mu_c - mu_G: -1/(C-1) in both cases,
        since centring an orthogonal frame gives a simplex ETF.
    w_scale : s in W_c = s mu_c (= s (mu_c - mu_G) with a bias, the theorem's NC3).
    Fields that describe a direction are None for the "zero" geometry.
    loss : the minimal loss.
    collapsed : delta < 1.
    geometry : "simplex_etf" (with bias), "orthogonal_frame" (no bias) or "zero".
    lam_product_max : 1/(N C^2), the collapse threshold on lam_w * lam_h.
    """

    C: int
    N: int
    lam_w: float
    lam_h: float
    bias: bool
    delta: float
    eps: float
    f_correct: float
    f_other: float
    w_row_norm_sq: float
    h_norm_sq: float
    cos_w: float | None
    cos_h: float | None
    w_scale: float | None
    loss: float
    collapsed: bool
    geometry: str
    lam_product_max: float

    @property
    def min_dim(self) -> int:
        """Smallest feature dimension p that holds the minimizer: C-1 with a bias, C without."""
        return self.C - 1 if self.bias else self.C

    @property
    def attained(self) -> bool:
        """False when exactly one of lam_w, lam_h is zero on the collapse side: rescaling
        (W, H) -> (W/t, t H) then lowers the loss towards an infimum that no point reaches."""
        return not (self.collapsed and (self.lam_w == 0) != (self.lam_h == 0))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self, p: int, *, rng: np.random.Generator | int | None = None) -> UFMParams:
        """An exact global minimizer (H (p, n), W (C, p), b) in dimension p, optionally rotated.

        W = a F and H = m F[labels]^T, with F the unit frame (simplex ETF with a bias, orthogonal
        frame without), a^2 = w_row_norm_sq, m^2 = h_norm_sq, and b = 1/C.
        """
        p = check_positive_int("p", p)
        if p < self.min_dim:
            raise ValueError(
                f"the minimizer needs p >= {self.min_dim} ({'C-1' if self.bias else 'C'}), got {p}"
            )
        if not self.attained:
            raise ValueError("with exactly one of lam_w, lam_h zero the infimum is not attained")
        frame = (simplex_etf if self.bias else orthogonal_frame)(self.C, p, rng=rng)  # (C, p) unit rows
        labels = np.repeat(np.arange(self.C), self.N)
        W = np.sqrt(self.w_row_norm_sq) * frame
        H = np.sqrt(self.h_norm_sq) * frame[labels].T  # (p, n)
        b = np.full(self.C, 1.0 / self.C) if self.bias else None
        return UFMParams(H, (W,), b)


def ufm_optimum(C: int, N: int, lam_w: float, lam_h: float, *, bias: bool = True) -> UFMOptimum:
    """Global minimizer of the square-loss UFM with an unregularized bias or none (derived here).

    Parameters
    ----------
    C : classes (>= 2); N : examples per class (>= 1); lam_w, lam_h : weight decays (>= 0);
    bias : with an unregularized bias (simplex ETF) or without one (orthogonal frame).

    With lam_w = lam_h = 0 the minimizer interpolates (eps = 0) and its scale is free; ``build`` then
    returns the balanced one (||W||^2 = ||H||^2/N per class, as with equal decays).
    """
    C = check_classes(C)
    N = check_positive_int("N", N)
    lam_w = check_nonneg("lam_w", lam_w)
    lam_h = check_nonneg("lam_h", lam_h)
    delta = float(ufm_delta(C, N, lam_w, lam_h))
    if delta < 1:
        # The scale s = ||W_c||/||mu_c|| is free when both decays vanish: take the balanced one.
        scale = float(ufm_w_scale(N, lam_w, lam_h)) if lam_w > 0 and lam_h > 0 else float(np.sqrt(N))
        product = float(ufm_norm_product(C, N, lam_w, lam_h, bias))
        return UFMOptimum(
            C, N, lam_w, lam_h, bias, delta,
            eps=float(ufm_eps(C, N, lam_w, lam_h, bias)),
            f_correct=float(1 - ufm_eps(C, N, lam_w, lam_h, bias)),
            f_other=float(ufm_f_other(C, N, lam_w, lam_h, bias)),
            w_row_norm_sq=scale * product,
            h_norm_sq=product / scale,
            cos_w=float(sqi_cosine(C)) if bias else 0.0,
            cos_h=float(sqi_cosine(C)),
            w_scale=scale,
            loss=float(ufm_loss(C, N, lam_w, lam_h, bias)),
            collapsed=True,
            geometry="simplex_etf" if bias else "orthogonal_frame",
            lam_product_max=float(ufm_collapse_bound(C, N)),
        )  # fmt: skip
    f_out = 1.0 / C if bias else 0.0
    return UFMOptimum(
        C, N, lam_w, lam_h, bias, delta, eps=1.0 - f_out, f_correct=f_out, f_other=f_out,
        w_row_norm_sq=0.0, h_norm_sq=0.0, cos_w=None, cos_h=None, w_scale=None,
        loss=float(ufm_zero_loss(C, bias)), collapsed=False, geometry="zero",
        lam_product_max=float(ufm_collapse_bound(C, N)),
    )  # fmt: skip
