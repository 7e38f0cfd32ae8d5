"""Closed forms: the poster's theorem, Lemma 1, and the global minimizer of the regularized UFM.

Every formula here is written once and evaluates on NumPy numbers and on SymPy symbols alike, so
``ufm.proofs`` checks the very expressions the library computes.

Global minimizer (docs/theory.md §5). Square loss, balanced classes, depth 1, bias unregularized or
absent, label smoothing a (targets T = (1 - a) Y + a/C):

1. For fixed Z = W H, min {lam_w/2 ||W||^2 + lam_h/2 ||H||^2 : W H = Z} = sqrt(lam_w lam_h) ||Z||_*
   (the balanced factorization attains it).
2. T = A Y with A = (1 - a)(I - 11^T/C) + 11^T/C: its singular values are sqrt(N)(1 - a) on the C-1
   centred directions and sqrt(N) on the mean direction. A free bias takes the mean direction
   (b = 1/C) at no cost.
3. min_Z 1/(2n)||Z - T||^2 + sqrt(lam_w lam_h)||Z||_* soft-thresholds every singular value at
   sqrt(N) delta, delta = C sqrt(N lam_w lam_h); a value sigma (units sqrt(N)) costs
   (delta sigma - delta^2/2)/C if sigma > delta, else sigma^2/(2C).

Regimes: collapse iff delta < 1 - a (simplex ETF with a bias; orthogonal frame without at a = 0, a
"smoothed frame" with positive row cosines at a > 0); without a bias and 1 - a <= delta < 1 only
the mean direction survives (rank one: every class gets the same output); otherwise zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._validation import check_classes, check_label_smoothing, check_nonneg, check_positive_int
from .geometry import orthogonal_frame, simplex_etf
from .params import UFMParams


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


def sqi_w_scale(C: Any, eps: Any, lam: Any, label_smoothing: Any = 0) -> Any:
    """NC3 scale: W_L^c = (eps - eps_a)/(lam (C-1)) (mu_c - mu_G) (poster, theorem, from dW_L^c/dt = 0),
    eps_a = a (C-1)/C the smoothed targets' own eps (0 without smoothing; docs/theory.md §4.3)."""
    return (eps - ufm_smoothing_eps(C, label_smoothing)) / (lam * (C - 1))


def sqi_w_row_norm_sq(C: Any, eps: Any, lam: Any, label_smoothing: Any = 0) -> Any:
    """NC2 equinorm: ||W_L^c||^2 = (eps - eps_a)(1 - C eps/(C-1)) / (C lam), which is the poster's
    (eps - C eps^2/(C-1)) / (C lam) without smoothing (docs/theory.md §4.3)."""
    return (eps - ufm_smoothing_eps(C, label_smoothing)) * (1 - C * eps / (C - 1)) / (C * lam)


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
    if _is_symbolic(C, N, lam_w, lam_h):
        return C * _sqrt(N * lam_w * lam_h)
    # A product of square roots: N lam_w lam_h itself overflows or underflows at decays such as
    # (1e200, 1e200) or (1e-300, 1e-300) (docs/theory.md §17.8).
    return C * np.sqrt(N) * np.sqrt(lam_w) * np.sqrt(lam_h)


def ufm_collapse_bound(C: Any, N: Any, label_smoothing: Any = 0) -> Any:
    """Largest lam_w * lam_h with a collapsed minimizer: (1 - a)^2/(N C^2) (delta < 1 - a)."""
    return (1 - label_smoothing) ** 2 * _one(C, N) / (N * C**2)


def ufm_smoothing_eps(C: Any, label_smoothing: Any) -> Any:
    """eps of the smoothed targets themselves: a (C-1)/C (they are SQI targets; docs/theory.md §5.3)."""
    return label_smoothing * (C - 1) * _one(C) / C


def ufm_eps(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """eps = 1 - correct-class output on the collapse side (delta < 1 - a): (C-1)(a + delta)/C with a
    bias, ((C-1)(a + delta) + delta)/C without; at a = 0, (C-1) sqrt(N lam_w lam_h) and delta."""
    delta, a = ufm_delta(C, N, lam_w, lam_h), label_smoothing
    eps = (C - 1) * (a + delta) * _one(C) / C
    return eps if bias else eps + delta / C


def ufm_f_other(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """Output on a wrong class (delta < 1 - a): (a + delta)/C = eps/(C-1) with a bias (SQI), a/C
    without (the wrong-class target itself)."""
    a = label_smoothing
    return (a + ufm_delta(C, N, lam_w, lam_h)) / C if bias else a * _one(C) / C


def ufm_w_scale(N: Any, lam_w: Any, lam_h: Any) -> Any:
    """s in W_c = s mu_c at the global minimizer: sqrt(lam_h N / lam_w) = delta/(C lam_w)."""
    if _is_symbolic(N, lam_w, lam_h):
        return _sqrt(lam_h * N / lam_w)
    # A ratio of square roots: lam_h N / lam_w overflows at (lam_w, lam_h) = (1e-300, 1e200), where
    # s = 2.2e250 is in range (docs/theory.md §17.8).
    return np.sqrt(lam_h) * np.sqrt(N) / np.sqrt(lam_w)


def _mode_weights(
    C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool, label_smoothing: Any
) -> tuple[Any, Any]:
    """(q_perp, q_1): the thresholded singular values of the targets, in units of sqrt(N), on the
    centred directions 1^perp and on the mean direction 1/sqrt(C) (collapse side, delta < 1 - a).
    With a bias the mean direction is the bias's, so q_1 = 0 (docs/theory.md §5.2)."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    return 1 - label_smoothing - delta, 0 * delta if bias else 1 - delta


def ufm_norm_product(
    C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0
) -> Any:
    """q = ||W_c|| ||mu_c|| = q_perp (C-1)/C + q_1/C: the thresholded singular values shared between W
    and H, per class (delta < 1 - a); (1 - delta) k/C at a = 0."""
    q_perp, q_1 = _mode_weights(C, N, lam_w, lam_h, bias, label_smoothing)
    return (q_perp * (C - 1) + q_1) * _one(C) / C


def ufm_w_row_norm_sq(
    C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0
) -> Any:
    """||W_c||^2 = sqrt(lam_h N / lam_w) q at the global minimizer (delta < 1 - a)."""
    return ufm_w_scale(N, lam_w, lam_h) * ufm_norm_product(C, N, lam_w, lam_h, bias, label_smoothing)


def ufm_h_norm_sq(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """||mu_c||^2 = ||h_i||^2 = sqrt(lam_w / (lam_h N)) q (delta < 1 - a)."""
    return ufm_norm_product(C, N, lam_w, lam_h, bias, label_smoothing) / ufm_w_scale(N, lam_w, lam_h)


def ufm_cos_w(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """Cosine of two classifier rows (delta < 1 - a): -1/(C-1) with a bias (simplex ETF); without one
    q_1 - q_perp over C q, i.e. a/((1 - a - delta)(C-1) + 1 - delta), 0 at a = 0 (orthogonal frame)."""
    if bias:
        return sqi_cosine(C)
    q_perp, q_1 = _mode_weights(C, N, lam_w, lam_h, bias, label_smoothing)
    return (q_1 - q_perp) / (q_perp * (C - 1) + q_1)


def ufm_loss(C: Any, N: Any, lam_w: Any, lam_h: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """Minimal loss on the collapse side (delta < 1 - a): the soft-threshold cost
    (delta sigma - delta^2/2)/C of each target singular value sigma (units sqrt(N)): C-1 values 1 - a,
    and without a bias also 1 (the mean direction). (k/C)(delta - delta^2/2) at a = 0."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    value = (C - 1) * (delta * (1 - label_smoothing) - delta**2 / 2) * _one(C) / C
    return value if bias else value + (delta - delta**2 / 2) / C


def ufm_rank_one_loss(C: Any, N: Any, lam_w: Any, lam_h: Any, label_smoothing: Any = 0) -> Any:
    """No bias, 1 - a <= delta < 1: only the mean direction survives the threshold; its cost plus the
    C-1 centred values left at zero, (delta - delta^2/2)/C + (C-1)(1 - a)^2/(2C)."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    return (delta - delta**2 / 2) / C + (C - 1) * (1 - label_smoothing) ** 2 / (2 * C)


def ufm_zero_loss(C: Any, bias: bool = True, label_smoothing: Any = 0) -> Any:
    """Loss of the zero solution W = H = 0 (b = 1/C with a bias): every target singular value left
    unfitted, (C-1)(1 - a)^2/(2C), plus 1/(2C) without a bias; k/(2C) at a = 0."""
    value = (C - 1) * (1 - label_smoothing) ** 2 * _one(C) / (2 * C)
    return value if bias else value + _one(C) / (2 * C)


# ---------------------------------------------------------------------------------------------
# Regularized bias lam_b > 0 (docs/theory.md §6; derived here). The centred modes are those of §5;
# the mean mode is shared between the bias (cost lam_b C beta^2/2) and the features (cost delta per
# unit of mean output): with x the mean output per class, minimize
# C/2 (x - 1/C)^2 + delta (x - beta) + lam_b C beta^2/2 over beta <= x.


def ufm_bias_boundary(lam_b: Any) -> Any:
    """delta at which the regimes of a regularized bias meet: lam_b/(1 + lam_b). Below it the bias
    saturates and the features carry part of the mean output (q_1 > 0); at or above it the bias
    carries the whole mean (q_1 = 0)."""
    return lam_b / (1 + lam_b)


def ufm_bias_mean(C: Any, lam_b: Any) -> Any:
    """Bias entry when it carries the whole mean output (delta >= ufm_bias_boundary): 1/(C(1 + lam_b))."""
    return _one(C) / (C * (1 + lam_b))


def ufm_bias_saturated(C: Any, N: Any, lam_w: Any, lam_h: Any, lam_b: Any) -> Any:
    """Bias entry when it saturates (delta < ufm_bias_boundary): delta/(lam_b C), where its marginal
    cost lam_b C beta equals the features' delta."""
    return ufm_delta(C, N, lam_w, lam_h) / (lam_b * C)


def ufm_mean_weight_saturated(C: Any, N: Any, lam_w: Any, lam_h: Any, lam_b: Any) -> Any:
    """q_1 of the mean mode when the bias saturates: 1 - delta - delta/lam_b (> 0 below the boundary)."""
    delta = ufm_delta(C, N, lam_w, lam_h)
    return 1 - delta - delta / lam_b


def ufm_mean_loss_bias(C: Any, N: Any, lam_w: Any, lam_h: Any, lam_b: Any, saturated: bool) -> Any:
    """Cost of the mean mode with a regularized bias: (delta - delta^2/2 - delta^2/(2 lam_b))/C when
    the bias saturates, lam_b/(2 C (1 + lam_b)) when it carries the whole mean."""
    if not saturated:
        return lam_b * _one(C) / (2 * C * (1 + lam_b))
    delta = ufm_delta(C, N, lam_w, lam_h)
    return (delta - delta**2 / 2 - delta**2 / (2 * lam_b)) / C


def ufm_centred_loss(C: Any, N: Any, lam_w: Any, lam_h: Any, label_smoothing: Any, collapsed: bool) -> Any:
    """Cost of the C-1 centred modes (value 1 - a each): (C-1)/C (delta (1 - a) - delta^2/2) when they
    are kept (delta < 1 - a), (C-1)(1 - a)^2/(2C) when they are sent to zero."""
    a = label_smoothing
    if not collapsed:
        return (C - 1) * (1 - a) ** 2 * _one(C) / (2 * C)
    delta = ufm_delta(C, N, lam_w, lam_h)
    return (C - 1) * (delta * (1 - a) - delta**2 / 2) * _one(C) / C


GEOMETRIES = ("simplex_etf", "orthogonal_frame", "smoothed_frame", "rank_one", "zero", "other")


@dataclass(frozen=True)
class UFMOptimum:
    """Global minimizer of the regularized square-loss UFM, depth 1, balanced (docs/theory.md §5, §6).

    Attributes
    ----------
    C, N, lam_w, lam_h, bias : the problem.
    lam_b : decay of the bias (0 = unregularized; docs/theory.md §6 for lam_b > 0).
    label_smoothing : a; the targets are (1 - a) y + a/C.
    delta : C sqrt(N lam_w lam_h); the centred modes are kept iff delta < 1 - a.
    eps : 1 minus the output on the correct class.
    eps_label_smoothing : a (C-1)/C, the eps of the smoothed targets themselves, beside ``eps``.
    f_correct, f_other : outputs on the correct and on a wrong class.
    w_row_norm_sq : ||W_c||^2 of every classifier row.
    h_norm_sq : ||mu_c||^2 of every class mean (= ||h_i||^2: features are collapsed); with an
        unregularized bias mu_G = 0, so this is also ||mu_c - mu_G||^2.
    cos_w : cosine between two distinct classifier rows: -1/(C-1) (ETF), 0 (orthogonal frame),
        (q_1 - q_perp)/(q_perp (C-1) + q_1) in general, 1 (rank one).
    cos_h : cosine between two distinct centred class means mu_c - mu_G: -1/(C-1) whenever the
        centred modes are kept (centring removes the mean mode).
    w_scale : s in W_c = s mu_c (= s (mu_c - mu_G) with a bias, the theorem's NC3).
    Fields that describe a direction are None where it is undefined (the zero solution; cos_h of the
    rank-one solution, whose class means coincide).
    loss : the minimal loss.
    collapsed : delta < 1 - a (classes separated, NC1-NC3 hold).
    geometry : one of GEOMETRIES: "simplex_etf" (mean mode 0), "orthogonal_frame" (no bias, a = 0),
        "smoothed_frame" (no bias, a > 0), "other" (regularized bias that saturates: both modes, rank
        C), "rank_one" (only the mean mode), "zero".
    lam_product_max : (1 - a)^2/(N C^2), the collapse threshold on lam_w * lam_h.
    q_perp, q_1 : thresholded target singular values (units sqrt(N)) on the centred directions and on
        the mean direction; W W^T = w_scale (q_perp P_perp + q_1 P_1).
    beta : the bias entry (b = beta 1), None without a bias.
    regime : short name of the case: "collapse", "rank_one", "zero", with "_bias_saturated" where a
        regularized bias saturates and the features carry part of the mean (delta < lam_b/(1 + lam_b)).
    rank : rank of Z = W H (the number of modes kept).
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
    label_smoothing: float = 0.0
    eps_label_smoothing: float = 0.0
    lam_b: float = 0.0
    q_perp: float = 0.0
    q_1: float = 0.0
    beta: float | None = None
    regime: str = ""
    rank: int = 0

    @property
    def min_dim(self) -> int:
        """Smallest feature dimension p that holds the minimizer: the rank of W H (at least 1)."""
        return max(self.rank, 1)

    @property
    def attained(self) -> bool:
        """False when exactly one of lam_w, lam_h is zero and the minimizer is nonzero: rescaling
        (W, H) -> (W/t, t H) then lowers the loss towards an infimum that no point reaches."""
        return not (self.w_row_norm_sq > 0 and (self.lam_w == 0) != (self.lam_h == 0))

    @property
    def z_singular_values(self) -> list[float]:
        """The C singular values of Z = W H (C, n), descending: sqrt(N) q_perp (C-1 times) and
        sqrt(N) q_1."""
        values = [self.q_perp] * (self.C - 1) + [self.q_1]
        return sorted((float(np.sqrt(self.N)) * v for v in values), reverse=True)

    @property
    def b(self) -> list[float] | None:
        """The bias as a list (b = beta 1), None without one."""
        return None if self.beta is None else [self.beta] * self.C

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "z_singular_values": self.z_singular_values, "b": self.b}

    def build(self, p: int, *, rng: np.random.Generator | int | None = None) -> UFMParams:
        """An exact global minimizer (H (p, n), W (C, p), b) in dimension p, optionally rotated.

        W = sqrt(s) (sqrt(q_perp) P_perp + sqrt(q_1) P_1) R, so that W W^T = s (q_perp P_perp + q_1 P_1)
        (docs/theory.md §5.2), with R orthonormal rows and P_perp, P_1 the projections on 1^perp and 1;
        H = (W/s)[labels]^T and b = beta 1. With q_1 = 0 the rows are a simplex ETF (p >= C-1 suffices).
        """
        p = check_positive_int("p", p)
        if p < self.min_dim:
            raise ValueError(f"the minimizer ({self.geometry}) needs p >= {self.min_dim}, got {p}")
        if not self.attained:
            raise ValueError("with exactly one of lam_w, lam_h zero the infimum is not attained")
        C = self.C
        q_perp, q_1 = self._mode_weights()
        if q_1 == 0:
            core = np.sqrt(q_perp * (C - 1) / C) * simplex_etf(C, p, rng=rng)  # (C, p)
        elif q_perp == 0:
            e = np.eye(1, p) if rng is None else np.random.default_rng(rng).standard_normal((1, p))
            core = np.sqrt(q_1 / C) * np.ones((C, 1)) @ (e / np.linalg.norm(e))
        else:
            R = orthogonal_frame(C, p, rng=rng)
            mean_row = R.mean(axis=0, keepdims=True)  # P_1 R
            core = np.sqrt(q_perp) * (R - mean_row) + np.sqrt(q_1) * mean_row
        scale = self.w_scale if self.w_scale is not None else 1.0
        W = np.sqrt(scale) * core
        labels = np.repeat(np.arange(C), self.N)
        H = (W / scale)[labels].T  # (p, n)
        b = None if self.beta is None else np.full(C, self.beta)
        return UFMParams(H, (W,), b)

    def _mode_weights(self) -> tuple[float, float]:
        """(q_perp, q_1) of this minimizer, zero for the modes the threshold removed."""
        return self.q_perp, self.q_1


def _thresholded_modes(C: int, N: int, lam_w: float, lam_h: float, bias: bool, a: float, lam_b: float):
    """(q_perp, q_1, beta, saturated) on both sides of every threshold (docs/theory.md §5.1, §6)."""
    delta = float(ufm_delta(C, N, lam_w, lam_h))
    q_perp = max(1.0 - a - delta, 0.0)
    if not bias:
        return q_perp, max(1.0 - delta, 0.0), None, False
    if lam_b == 0:
        return q_perp, 0.0, 1.0 / C, False
    if delta < float(ufm_bias_boundary(lam_b)):
        q_1 = float(ufm_mean_weight_saturated(C, N, lam_w, lam_h, lam_b))
        return q_perp, q_1, float(ufm_bias_saturated(C, N, lam_w, lam_h, lam_b)), True
    return q_perp, 0.0, float(ufm_bias_mean(C, lam_b)), False


def _geometry(q_perp: float, q_1: float, bias: bool, a: float) -> str:
    if q_perp > 0 and q_1 == 0:
        return "simplex_etf"
    if q_perp > 0:
        if bias:
            return "other"
        return "orthogonal_frame" if a == 0 else "smoothed_frame"
    return "rank_one" if q_1 > 0 else "zero"


def ufm_optimum(
    C: int, N: int, lam_w: float, lam_h: float, *, bias: bool = True, label_smoothing: float = 0.0,
    lam_b: float = 0.0,
) -> UFMOptimum:  # fmt: skip
    """Global minimizer of the square-loss UFM, depth 1, balanced (docs/theory.md §5, §6).

    Parameters
    ----------
    C : classes (>= 2); N : examples per class (>= 1); lam_w, lam_h : weight decays (>= 0);
    bias : with a bias or without one; label_smoothing : a in [0, 1); lam_b : decay of the bias
    (>= 0, 0 = unregularized; ignored without a bias).

    With lam_w = lam_h = 0 the minimizer interpolates the targets and its scale is free; ``build``
    then returns the balanced one (||W_c||^2 = N ||mu_c||^2, as with equal decays).
    """
    C = check_classes(C)
    N = check_positive_int("N", N)
    lam_w = check_nonneg("lam_w", lam_w)
    lam_h = check_nonneg("lam_h", lam_h)
    lam_b = check_nonneg("lam_b", lam_b) if bias else 0.0
    a = check_label_smoothing(label_smoothing)
    delta = float(ufm_delta(C, N, lam_w, lam_h))
    args = (C, N, lam_w, lam_h)
    q_perp, q_1, beta, saturated = _thresholded_modes(C, N, lam_w, lam_h, bias, a, lam_b)
    collapsed = q_perp > 0
    # The loss is the cost of the centred modes plus that of the mean mode: the bias's (lam_b >= 0),
    # or the features' soft threshold without a bias.
    value = float(ufm_centred_loss(*args, a, collapsed))
    if bias:
        value += float(ufm_mean_loss_bias(*args, lam_b, saturated)) if lam_b > 0 else 0.0
    else:
        value += (delta - delta**2 / 2) / C if q_1 > 0 else 1.0 / (2 * C)
    # The scale s = ||W_c||/||mu_c|| is free when both decays vanish: take the balanced one.
    with np.errstate(over="ignore"):  # an s out of range is refused below
        scale = float(ufm_w_scale(N, lam_w, lam_h)) if lam_w > 0 and lam_h > 0 else float(np.sqrt(N))
    if not (math.isfinite(scale) and math.isfinite(1.0 / scale)):
        # ||W_c||^2 ~ s and ||mu_c||^2 ~ 1/s: one of them is past the floating range (about 1.8e308).
        raise ValueError(
            f"the minimizer's norms are beyond the floating range at lam_w = {lam_w:g}, lam_h = {lam_h:g}: "
            f"||W_c|| / ||mu_c|| = sqrt(lam_h N / lam_w) = {scale:g}; bring lam_h / lam_w closer to 1"
        )
    product = (q_perp * (C - 1) + q_1) / C  # q = ||W_c|| ||mu_c||
    mean_out = q_1 / C + (beta or 0.0)  # mean output per class
    f_correct, f_other = q_perp * (C - 1) / C + mean_out, -q_perp / C + mean_out
    if not bias:
        f_other = a / C if collapsed else mean_out  # the wrong-class target, or the rank-one output
    geometry = _geometry(q_perp, q_1, bias, a)
    kind = "collapse" if collapsed else ("rank_one" if q_1 > 0 else "zero")
    return UFMOptimum(
        C, N, lam_w, lam_h, bias, delta, eps=1.0 - f_correct, f_correct=f_correct, f_other=f_other,
        w_row_norm_sq=scale * product, h_norm_sq=product / scale,
        cos_w=(q_1 - q_perp) / (C * product) if product > 0 else None,
        cos_h=float(sqi_cosine(C)) if collapsed else None, w_scale=scale if product > 0 else None,
        loss=value, collapsed=collapsed, geometry=geometry,
        lam_product_max=float(ufm_collapse_bound(C, N, a)), label_smoothing=a,
        eps_label_smoothing=float(ufm_smoothing_eps(C, a)), lam_b=lam_b, q_perp=q_perp, q_1=q_1,
        beta=beta, regime=kind + ("_bias_saturated" if saturated else ""),
        rank=(C - 1) * (q_perp > 0) + (q_1 > 0),
    )  # fmt: skip
