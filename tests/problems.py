"""Reference UFM problems with their exact answers typed out (after torchdiffeq's ``tests/problems.py``).

Each :class:`Reference` holds one problem's settings and the global minimizer of

    L = 1/(2n) ||W H + b 1^T - T||^2 + lam_w/2 ||W||^2 + lam_h/2 ||H||^2,   T = (1-a) Y + (a/C) 1 1^T,

(balanced classes, N per class, n = N C, depth 1, bias unregularized or absent) as literal numbers.
**None of them is computed by ufm.** They were obtained twice, outside the library:

1. by hand, from singular-value soft thresholding of the targets (delta = C sqrt(N lam_w lam_h)):
   with a bias the centred targets have C-1 singular values (1-a) sqrt(N); without one T has C-1 of
   (1-a) sqrt(N) (the centred part) and one of sqrt(N) (the mean direction 1/C 1 1^T). Each becomes
   max(sigma - delta sqrt(N), 0). Evaluated in mpmath at 40 digits and typed out at 16;
2. by a direct L-BFGS minimization (scipy, 4 random starts, gtol 1e-13) of the loss above written
   from the definition with its own hand gradient, not ufm's. It agreed with every typed loss to
   <= 2e-15 relative, and with the outputs, row norms, cosines and nc3 to <= 2e-8 (||grad|| ~ 1e-9).

Regimes (geometry names as in ``ufm.closed_form``):

* with a bias: "simplex_etf" when delta < 1-a (cos_w = cos_h = -1/(C-1)), else "zero" (outputs 1/C);
* without a bias: "orthogonal_frame" (a = 0) or "smoothed_frame" (a > 0) when delta < 1-a, with
  cos_w = a/((1-a-delta)(C-1) + 1 - delta) and the centred means a simplex ETF; "rank_one" when
  1-a <= delta < 1 (every output (1-delta)/C, W's rows parallel, centred means zero); "zero" when
  delta >= 1.

Fields: ``w_row_norm_sq`` = ||W_c||^2, ``h_norm_sq`` = ||mu_c||^2 (uncentred class mean, = ||h_i||^2);
``cos_h`` is between centred class means mu_c - mu_G; ``nc3`` = ||W^T/||W||_F - M/||M||_F||_F^2 with M
the centred means (0 with a bias, where W_c = s mu_c and mu_G = 0; without one W_c = s mu_c is
uncentred and nc3 = 2 - 2 sqrt((C-1)(1-a-delta) / ((C-1)(1-a-delta) + 1 - delta))). Fields that need a
direction (cosines, nc3) are None where the vectors vanish.

Also typed out here for the metric and geometry tests: a simplex ETF (``helmert_etf``) and the
Procrustes distance to a frame by an explicit SVD (``procrustes_distance``), independent of
``ufm.geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ufm.model import UFMProblem

DTYPES = (np.float32, np.float64)

# The numerical answers every route to the minimizer must reproduce (geometry is compared by name).
ANSWER_FIELDS = (
    "delta",
    "eps",
    "f_correct",
    "f_other",
    "w_row_norm_sq",
    "h_norm_sq",
    "cos_w",
    "cos_h",
    "loss",
)

# Tolerances per dtype for quantities measured on the exact minimizer after casting its (W, H, b)
# to that dtype (the library's metrics then compute in float64 from the cast values; the torch loss
# computes in the dtype). Worst errors measured over the catalogue are in brackets.
TOLERANCES: dict[type, dict[str, float]] = {
    np.float64: {
        # Loss from O(1) outputs and norms summed over <= 10^3 terms: a few ulps [4e-16].
        "loss_rtol": 1e-13,
        # Cosines, and nc3 = 2 - 2x: rounding of O(1) dot products and norms [3e-16].
        "cos_atol": 1e-13,
        # Measures that vanish at exact collapse (nc1, nc2_*, nc3 with a bias): nc1 is a ratio of
        # squared rounding errors; the std of C(C-1) equal cosines carries their rounding [3e-16].
        "nc_atol": 1e-12,
        # eps = 1 - mean correct output: the subtraction magnifies the outputs' rounding by 1/eps,
        # and eps is as small as 0.018 in the catalogue [2e-14].
        "metric_rtol": 1e-12,
    },
    np.float32: {
        # The cast moves each entry by up to 6e-8 relatively, and torch sums the data loss and the
        # decay in float32 over n <= 20 examples and C <= 10 classes [1.5e-7].
        "loss_rtol": 2e-6,
        # A cosine of two cast vectors moves by a few units of 6e-8; nc3 = 2 - 2x doubles that [1e-8].
        "cos_atol": 1e-6,
        # The cast features stay exactly equal within a class (nc1 ~ 0), but the class means' norms
        # and cosines carry the cast's rounding, so nc2_* are ~1e-8, not 1e-16 [2.5e-8].
        "nc_atol": 2e-6,
        # eps = 1 - mean correct output from cast W, H and b, magnified by 1/eps (up to 55) [2.6e-7].
        "metric_rtol": 5e-6,
    },
}


# ---------------------------------------------------------------- frames typed out
def helmert_etf(C: int) -> np.ndarray:
    """A simplex ETF typed out, (C, C-1): the Helmert basis of 1^perp, column k (k = 1..C-1) equal to
    1/sqrt(k(k+1)) on rows c < k, -k/sqrt(k(k+1)) on row k and 0 below. Orthonormal columns orthogonal
    to 1, so its rows sum to 0 and its Gram is I - 11^T/C (norms sqrt((C-1)/C), cosines -1/(C-1))."""
    B = np.zeros((C, C - 1))
    for k in range(1, C):
        B[:k, k - 1] = 1.0 / np.sqrt(k * (k + 1))
        B[k, k - 1] = -k / np.sqrt(k * (k + 1))
    return B


def procrustes_distance(V: np.ndarray, frame: str) -> float:
    """min over Q with orthonormal rows of || V/||V||_F - F Q ||_F, F the unit-Frobenius frame (C, k)
    ("simplex_etf": helmert_etf(C)/sqrt(C-1), k = C-1; "orthogonal_frame": I/sqrt(C), k = C), p >= k.

    Orthogonal Procrustes: Q = U Z^T from the thin SVD F^T V = U S Z^T; the residual is then formed
    explicitly (not by the library's shortcut sqrt(2 - 2 ||F^T V||_* / ||V||_F)).
    """
    C = V.shape[0]
    F = helmert_etf(C) / np.sqrt(C - 1) if frame == "simplex_etf" else np.eye(C) / np.sqrt(C)
    unit = V / np.linalg.norm(V)
    U, _, Zt = np.linalg.svd(F.T @ unit, full_matrices=False)  # (k, k), (k, p)
    return float(np.linalg.norm(unit - F @ (U @ Zt)))


# ---------------------------------------------------------------- the catalogue
@dataclass(frozen=True)
class Reference:
    """One UFM problem and its global minimizer's answers (typed out; see the module docstring).

    Settings: C classes, N examples per class, feature dimension p, weight decays lam_w and lam_h,
    bias (unregularized) or none, label smoothing a in [0, 1).
    Answers: geometry, delta = C sqrt(N lam_w lam_h), eps = 1 - f_correct, f_correct and f_other
    (outputs on the correct and on a wrong class), w_row_norm_sq = ||W_c||^2, h_norm_sq = ||mu_c||^2,
    cos_w (rows of W), cos_h (centred class means), nc3, and the minimal loss.
    """

    name: str
    C: int
    N: int
    p: int
    lam_w: float
    lam_h: float
    bias: bool
    label_smoothing: float
    geometry: str
    delta: float
    eps: float
    f_correct: float
    f_other: float
    w_row_norm_sq: float
    h_norm_sq: float
    cos_w: float | None
    cos_h: float | None
    nc3: float | None
    loss: float

    @property
    def collapsed(self) -> bool:
        """The centred class means form a simplex ETF (geometry not "rank_one" or "zero")."""
        return self.cos_h is not None

    def problem(self) -> UFMProblem:
        return UFMProblem(
            self.C, self.N, self.lam_w, self.lam_h, bias=self.bias, label_smoothing=self.label_smoothing
        )

    def __str__(self) -> str:  # pytest ids
        return self.name


# fmt: off
CASES: tuple[Reference, ...] = (
    # a = 0 with a bias: simplex ETF (C = 2: two antipodal vectors).
    Reference("etf_C2", C=2, N=3, p=2, lam_w=0.02, lam_h=0.05, bias=True, label_smoothing=0.0,
              geometry="simplex_etf", delta=0.1095445115010332, eps=0.05477225575051661,
              f_correct=0.9452277442494834, f_other=0.05477225575051661, w_row_norm_sq=1.219306393762915,
              h_norm_sq=0.1625741858350554, cos_w=-1.0, cos_h=-1.0, nc3=0.0, loss=0.05177225575051661),
    Reference("etf_C3", C=3, N=4, p=4, lam_w=0.01, lam_h=0.02, bias=True, label_smoothing=0.0,
              geometry="simplex_etf", delta=0.0848528137423857, eps=0.0565685424949238,
              f_correct=0.9434314575050762, f_other=0.0282842712474619, w_row_norm_sq=1.725618083164127,
              h_norm_sq=0.2157022603955158, cos_w=-0.5, cos_h=-0.5, nc3=0.0, loss=0.0541685424949238),
    Reference("etf_C4", C=4, N=3, p=5, lam_w=0.05, lam_h=0.03, bias=True, label_smoothing=0.0,
              geometry="simplex_etf", delta=0.2683281572999748, eps=0.2012461179749811,
              f_correct=0.7987538820250189, f_other=0.06708203932499369, w_row_norm_sq=0.7362305898749054,
              h_norm_sq=0.4090169943749474, cos_w=-0.3333333333333333, cos_h=-0.3333333333333333, nc3=0.0,
              loss=0.1742461179749811),
    Reference("etf_C10", C=10, N=2, p=12, lam_w=0.001, lam_h=0.002, bias=True, label_smoothing=0.0,
              geometry="simplex_etf", delta=0.02, eps=0.018, f_correct=0.982, f_other=0.002,
              w_row_norm_sq=1.764, h_norm_sq=0.441, cos_w=-0.1111111111111111, cos_h=-0.1111111111111111,
              nc3=0.0, loss=0.01782),
    # a = 0 without a bias: orthogonal frame; the centred means are still a simplex ETF.
    Reference("orth_C2", C=2, N=3, p=2, lam_w=0.02, lam_h=0.05, bias=False, label_smoothing=0.0,
              geometry="orthogonal_frame", delta=0.1095445115010332, eps=0.1095445115010332,
              f_correct=0.8904554884989668, f_other=0.0, w_row_norm_sq=2.438612787525831,
              h_norm_sq=0.3251483716701107, cos_w=0.0, cos_h=-1.0, nc3=0.585786437626905,
              loss=0.1035445115010332),
    Reference("orth_C3", C=3, N=4, p=4, lam_w=0.01, lam_h=0.02, bias=False, label_smoothing=0.0,
              geometry="orthogonal_frame", delta=0.0848528137423857, eps=0.0848528137423857,
              f_correct=0.9151471862576143, f_other=0.0, w_row_norm_sq=2.58842712474619,
              h_norm_sq=0.3235533905932738, cos_w=0.0, cos_h=-0.5, nc3=0.3670068381445479,
              loss=0.0812528137423857),
    Reference("orth_C4", C=4, N=3, p=5, lam_w=0.05, lam_h=0.03, bias=False, label_smoothing=0.0,
              geometry="orthogonal_frame", delta=0.2683281572999748, eps=0.2683281572999748,
              f_correct=0.7316718427000252, f_other=0.0, w_row_norm_sq=0.9816407864998738,
              h_norm_sq=0.5453559924999299, cos_w=0.0, cos_h=-0.3333333333333333, nc3=0.2679491924311227,
              loss=0.2323281572999748),
    Reference("orth_C10", C=10, N=2, p=12, lam_w=0.001, lam_h=0.002, bias=False, label_smoothing=0.0,
              geometry="orthogonal_frame", delta=0.02, eps=0.02, f_correct=0.98, f_other=0.0,
              w_row_norm_sq=1.96, h_norm_sq=0.49, cos_w=0.0, cos_h=-0.1111111111111111,
              nc3=0.1026334038989724, loss=0.0198),
    # delta >= 1: the zero solution (outputs 1/C with a bias, 0 without).
    Reference("zero_C3_bias", C=3, N=4, p=4, lam_w=0.2, lam_h=0.15, bias=True, label_smoothing=0.0,
              geometry="zero", delta=1.039230484541326, eps=0.6666666666666667,
              f_correct=0.3333333333333333, f_other=0.3333333333333333, w_row_norm_sq=0.0, h_norm_sq=0.0,
              cos_w=None, cos_h=None, nc3=None, loss=0.3333333333333333),
    Reference("zero_C4_nobias", C=4, N=5, p=6, lam_w=0.3, lam_h=0.2, bias=False, label_smoothing=0.0,
              geometry="zero", delta=2.190890230020664, eps=1.0, f_correct=0.0, f_other=0.0,
              w_row_norm_sq=0.0, h_norm_sq=0.0, cos_w=None, cos_h=None, nc3=None, loss=0.5),
    # a = 0.1 with a bias: still a simplex ETF, with eps = (C-1)(a + delta)/C.
    Reference("smooth_etf_C4", C=4, N=3, p=5, lam_w=0.01, lam_h=0.01, bias=True, label_smoothing=0.1,
              geometry="simplex_etf", delta=0.06928203230275509, eps=0.1269615242270663,
              f_correct=0.8730384757729337, f_other=0.04232050807568877, w_row_norm_sq=1.079134295108992,
              h_norm_sq=0.3597114317029974, cos_w=-0.3333333333333333, cos_h=-0.3333333333333333, nc3=0.0,
              loss=0.04496537180435969),
    Reference("smooth_etf_C10", C=10, N=2, p=12, lam_w=0.001, lam_h=0.002, bias=True, label_smoothing=0.1,
              geometry="simplex_etf", delta=0.02, eps=0.108, f_correct=0.892, f_other=0.012,
              w_row_norm_sq=1.584, h_norm_sq=0.396, cos_w=-0.1111111111111111, cos_h=-0.1111111111111111,
              nc3=0.0, loss=0.01602),
    # a = 0.1 without a bias: the smoothed frame, cos_w = a/((1-a-delta)(C-1) + 1 - delta) > 0.
    Reference("smooth_frame_C2", C=2, N=3, p=2, lam_w=0.02, lam_h=0.05, bias=False, label_smoothing=0.1,
              geometry="smoothed_frame", delta=0.1095445115010332, eps=0.1595445115010332,
              f_correct=0.8404554884989668, f_other=0.05, w_row_norm_sq=2.301682148149539,
              h_norm_sq=0.3068909530866052, cos_w=0.0594915503369474, cos_h=-1.0, nc3=0.6284983050225183,
              loss=0.09806728592598156),
    Reference("smooth_frame_C3", C=3, N=4, p=4, lam_w=0.01, lam_h=0.02, bias=False, label_smoothing=0.1,
              geometry="smoothed_frame", delta=0.0848528137423857, eps=0.1515194804090524,
              f_correct=0.8484805195909476, f_other=0.03333333333333333, w_row_norm_sq=2.399865316429777,
              h_norm_sq=0.2999831645537222, cos_w=0.03928591471894173, cos_h=-0.5, nc3=0.3994050395505566,
              loss=0.07559595949289332),
    Reference("smooth_frame_C10", C=10, N=2, p=12, lam_w=0.001, lam_h=0.002, bias=False, label_smoothing=0.1,
              geometry="smoothed_frame", delta=0.02, eps=0.11, f_correct=0.89, f_other=0.01,
              w_row_norm_sq=1.78, h_norm_sq=0.445, cos_w=0.01123595505617978, cos_h=-0.1111111111111111,
              nc3=0.1133228782333335, loss=0.018),
    # a = 0.1 with a bias, close below its threshold delta = 1 - a = 0.9.
    Reference("smooth_etf_C3_near", C=3, N=4, p=4, lam_w=0.2, lam_h=0.1, bias=True, label_smoothing=0.1,
              geometry="simplex_etf", delta=0.848528137423857, eps=0.6323520916159047,
              f_correct=0.3676479083840953, f_other=0.3161760458079523, w_row_norm_sq=0.04852813742385703,
              h_norm_sq=0.02426406871192851, cos_w=-0.5, cos_h=-0.5, nc3=0.0, loss=0.2691168824543142),
    # a = 0.1 without a bias, 1 - a <= delta < 1: rank one (any p >= 1; here p < C).
    Reference("rank_one_C3", C=3, N=4, p=3, lam_w=0.2, lam_h=0.125, bias=False, label_smoothing=0.1,
              geometry="rank_one", delta=0.9486832980505138, eps=0.9828944326835046,
              f_correct=0.0171055673164954, f_other=0.0171055673164954, w_row_norm_sq=0.02704627669472989,
              h_norm_sq=0.01081851067789196, cos_w=1.0, cos_h=None, nc3=None, loss=0.4362277660168379),
    Reference("rank_one_C4", C=4, N=2, p=2, lam_w=0.1, lam_h=0.3, bias=False, label_smoothing=0.1,
              geometry="rank_one", delta=0.9797958971132712, eps=0.9949489742783178,
              f_correct=0.00505102572168219, f_other=0.00505102572168219,
              w_row_norm_sq=0.01237243569579452, h_norm_sq=0.002062072615965754, cos_w=1.0, cos_h=None,
              nc3=None, loss=0.4286989742783178),
    # The rank_one_C3 settings with a bias: delta >= 1 - a is already the zero solution.
    Reference("zero_C3_bias_smooth", C=3, N=4, p=3, lam_w=0.2, lam_h=0.125, bias=True, label_smoothing=0.1,
              geometry="zero", delta=0.9486832980505138, eps=0.6666666666666667,
              f_correct=0.3333333333333333, f_other=0.3333333333333333, w_row_norm_sq=0.0, h_norm_sq=0.0,
              cos_w=None, cos_h=None, nc3=None, loss=0.27),
    # a = 0.1 without a bias, delta >= 1: the zero solution.
    Reference("zero_C3_nobias_smooth", C=3, N=4, p=4, lam_w=0.3, lam_h=0.2, bias=False, label_smoothing=0.1,
              geometry="zero", delta=1.469693845669907, eps=1.0, f_correct=0.0, f_other=0.0,
              w_row_norm_sq=0.0, h_norm_sq=0.0, cos_w=None, cos_h=None, nc3=None, loss=0.4366666666666667),
)
# fmt: on

BY_NAME: dict[str, Reference] = {case.name: case for case in CASES}
COLLAPSED = tuple(case for case in CASES if case.collapsed)
