"""Closed form of the cross-entropy UFM: depth 1, balanced classes, with or without a bias
(docs/theory.md §9; derived here on the ETF manifold, global for a = 0 by Zhu et al. [ZDZ+21]).

On W = alpha F, H = m F[labels]^T (F the unit-row simplex ETF, b = 0) every example has the correct
logit u = alpha m and the wrong logits -u/(C-1); with x = C u/(C-1) the logit gap and targets
smoothed by a (eps_a = a (C-1)/C),

    L = log(1 + (C-1) e^(-x)) + eps_a x + lam_w C alpha^2/2 + lam_h N C m^2/2,

and the penalty is at least delta u (AM-GM, equality at lam_w alpha^2 = lam_h N m^2), delta =
C sqrt(N lam_w lam_h). The remaining convex function of u is stationary where the total wrong-class
probability 1 - p_correct equals

    eps = eps_a + (C-1) delta/C              (the square loss's eps with a bias, docs/theory.md §5.3),

i.e. x = log((C-1)(1 - eps)/eps), which is positive iff delta < 1 - a; otherwise u = 0 (every logit
0, loss log C). The minimal loss is -log(1 - eps) + eps x. A bias does not change the minimizer:
the loss depends on logit differences only, so the optimal rows of W sum to zero and b = beta 1 is
free (unregularized) or 0 (regularized); b = 0 is reported.

Every formula here evaluates on NumPy numbers and SymPy symbols alike (``ufm.proofs.cross_entropy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .closed_form import _is_symbolic, _one, sqi_cosine, ufm_delta, ufm_smoothing_eps, ufm_w_scale
from .geometry import simplex_etf
from .params import UFMParams


def _log(x: Any) -> Any:
    if _is_symbolic(x):
        import sympy

        return sympy.log(x)
    return float(np.log(x))


def ce_eps(C: Any, N: Any, lam_w: Any, lam_h: Any, label_smoothing: Any = 0) -> Any:
    """Total wrong-class probability at the minimizer (delta < 1 - a): a (C-1)/C + (C-1) delta/C."""
    return ufm_smoothing_eps(C, label_smoothing) + (C - 1) * ufm_delta(C, N, lam_w, lam_h) * _one(C) / C


def ce_logit_gap(C: Any, eps: Any) -> Any:
    """x = f_correct - f_other = log((C-1)(1 - eps)/eps), from p_wrong/p_correct = e^(-x)."""
    return _log((C - 1) * (1 - eps) / eps)


def ce_correct_logit(C: Any, eps: Any) -> Any:
    """u = (C-1) x/C: the correct-class logit (the wrong ones are -x/C)."""
    return (C - 1) * ce_logit_gap(C, eps) / C


def ce_loss(C: Any, eps: Any) -> Any:
    """Minimal loss -log(1 - eps) + eps x (data term log(1/p_correct) + eps_a x, penalty delta u)."""
    return -_log(1 - eps) + eps * ce_logit_gap(C, eps)


def ce_zero_loss(C: Any) -> Any:
    """Loss of W = H = 0: log C (every class has probability 1/C)."""
    return _log(C)


@dataclass(frozen=True)
class CEOptimum:
    """Global minimizer of the cross-entropy UFM, depth 1, balanced (module docstring).

    Attributes
    ----------
    C, N, lam_w, lam_h, bias, label_smoothing : the problem; delta = C sqrt(N lam_w lam_h).
    p_wrong : total wrong-class probability 1 - p_correct at the minimizer ((C-1)/C at zero).
    f_correct, f_other : the logits of the correct class and of a wrong class.
    eps : 1 - f_correct, as ``ufm flow`` measures it (1 minus the mean correct-class output).
    w_row_norm_sq, h_norm_sq : ||W_c||^2 = s u and ||h_i||^2 = u/s, s = sqrt(lam_h N/lam_w).
    cos_w, cos_h : -1/(C-1) (simplex ETF) where delta < 1 - a, else None.
    loss, collapsed (delta < 1 - a), geometry ("simplex_etf" or "zero"), regime ("collapse" or
    "zero"), rank (C-1 or 0), lam_product_max ((1 - a)^2/(N C^2)), b (zeros, None without a bias).
    """

    C: int
    N: int
    lam_w: float
    lam_h: float
    bias: bool
    label_smoothing: float
    delta: float
    p_wrong: float
    f_correct: float
    f_other: float
    eps: float
    w_row_norm_sq: float
    h_norm_sq: float
    cos_w: float | None
    cos_h: float | None
    w_scale: float | None
    loss: float
    collapsed: bool
    geometry: str
    regime: str
    rank: int
    lam_product_max: float
    b: list[float] | None

    @property
    def min_dim(self) -> int:
        return max(self.rank, 1)

    @property
    def attained(self) -> bool:
        return not (self.w_row_norm_sq > 0 and (self.lam_w == 0) != (self.lam_h == 0))

    @property
    def z_singular_values(self) -> list[float]:
        """Singular values of Z = W H = u C/(C-1) P_perp Y: u C sqrt(N)/(C-1), C-1 times, and 0."""
        value = self.f_correct * self.C * np.sqrt(self.N) / (self.C - 1)
        return [float(value)] * (self.C - 1) + [0.0]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "z_singular_values": self.z_singular_values}

    def build(self, p: int, *, rng: np.random.Generator | int | None = None) -> UFMParams:
        """W = sqrt(s u) F, H = sqrt(u/s) F[labels]^T with F a unit-row simplex ETF; b = 0."""
        if p < self.min_dim:
            raise ValueError(f"the minimizer ({self.geometry}) needs p >= {self.min_dim}, got {p}")
        if not self.attained:
            raise ValueError("with exactly one of lam_w, lam_h zero the infimum is not attained")
        F = simplex_etf(self.C, p, rng=rng)  # (C, p) unit rows
        W = np.sqrt(self.w_row_norm_sq) * F
        H = (np.sqrt(self.h_norm_sq) * F)[np.repeat(np.arange(self.C), self.N)].T
        return UFMParams(H, (W,), np.zeros(self.C) if self.bias else None)


def ce_optimum(
    C: int, N: int, lam_w: float, lam_h: float, *, bias: bool = True, label_smoothing: float = 0.0
) -> CEOptimum:
    """The minimizer of the module docstring (lam_w, lam_h > 0 for a finite scale)."""
    a = label_smoothing
    delta = float(ufm_delta(C, N, lam_w, lam_h))
    if delta == 0 and a == 0:
        raise ValueError(
            "cross-entropy with a zero decay and no label smoothing: infimum not attained (the loss tends "
            "to 0 as the logits grow without bound); give lam_w, lam_h > 0 or a label smoothing"
        )
    collapsed = delta < 1 - a
    if collapsed:
        eps = float(ce_eps(C, N, lam_w, lam_h, a))
        u, x, value = float(ce_correct_logit(C, eps)), float(ce_logit_gap(C, eps)), float(ce_loss(C, eps))
    else:
        eps, u, x, value = (C - 1) / C, 0.0, 0.0, float(ce_zero_loss(C))
    scale = float(ufm_w_scale(N, lam_w, lam_h)) if lam_w > 0 and lam_h > 0 else float(np.sqrt(N))
    cos = float(sqi_cosine(C)) if collapsed else None
    return CEOptimum(
        C, N, lam_w, lam_h, bias, a, delta, p_wrong=eps, f_correct=u, f_other=u - x, eps=1.0 - u,
        w_row_norm_sq=scale * u, h_norm_sq=u / scale, cos_w=cos, cos_h=cos,
        w_scale=scale if collapsed else None, loss=value, collapsed=collapsed,
        geometry="simplex_etf" if collapsed else "zero", regime="collapse" if collapsed else "zero",
        rank=C - 1 if collapsed else 0, lam_product_max=(1 - a) ** 2 / (N * C**2),
        b=[0.0] * C if bias else None,
    )  # fmt: skip
