"""ufm.testing: hypothesis strategies for ufm's objects, and assertions about collapse.

For property tests of your own, the way ``hypothesis.extra.numpy`` serves NumPy users
(docs/proofs_and_testing.md has a worked example; ``examples/test_my_properties.py`` runs one)::

    from hypothesis import given
    from ufm.testing import assert_collapsed, collapsed_features, simplex_etfs, assert_simplex_etf

    @given(simplex_etfs(max_classes=8))
    def test_my_frame_code(M):
        assert_simplex_etf(my_transform(M), atol=1e-10)

Strategies (every bound a keyword; each shrinks towards the smallest, canonical case: two classes,
one example each, no extra dimension, no rotation, noise, shift or scaling, so a shrunk
counterexample is readable):

* :func:`simplex_etfs` and :func:`orthogonal_frames`: (C, p) frames as rows (docs/theory.md §1);
* :func:`collapsed_features`: :class:`CollapsedFeatures`, features (n, p) and labels (n,) collapsed
  onto a frame, with optional within-class noise, rotation, scale and shift;
* :func:`ufm_problems`: :class:`ufm.UFMProblem`, balanced or not, with or without a bias, any depth
  and loss; importing this module registers it for ``st.from_type(ufm.UFMProblem)``;
* :func:`ufm_params`: a point :class:`ufm.UFMParams` of a given problem.

Assertions raise AssertionError naming the property that failed and by how much:
:func:`assert_simplex_etf` (a matrix's rows) and :func:`assert_collapsed` (an :class:`ufm.NCMetrics`).

hypothesis is needed here only (the ``testing`` extra: ``pip install "ufm[testing]"``); ``import
ufm`` never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('ufm.testing needs hypothesis: pip install "ufm[testing]"') from err

from ._validation import check_nonneg
from .geometry import orthogonal_frame, simplex_etf
from .losses import LOSSES
from .metrics import NCMetrics
from .model import UFMProblem
from .params import UFMParams

__all__ = [
    "CollapsedFeatures", "assert_collapsed", "assert_simplex_etf", "collapsed_features",
    "orthogonal_frames", "simplex_etfs", "ufm_params", "ufm_problems",
]  # fmt: skip

# Seeds of random rotations and noise: any 32-bit integer.
_SEEDS = st.integers(0, 2**32 - 1)


def _rotation_seed(rotate: bool) -> st.SearchStrategy[int | None]:
    """None (the canonical embedding, first coordinate axes) or a seed of a Haar-random rotation;
    shrinks to None."""
    return st.one_of(st.none(), _SEEDS) if rotate else st.none()


def _scales(min_scale: float, max_scale: float) -> st.SearchStrategy[float]:
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    if min_scale == max_scale:
        return st.just(float(min_scale))
    # 1.0 first when in range: the simplest scale to read in a counterexample.
    floats = st.floats(min_scale, max_scale, allow_nan=False, allow_infinity=False)
    return st.one_of(st.just(1.0), floats) if min_scale <= 1.0 <= max_scale else floats


def _check_bounds(name: str, low: int, high: int, least: int) -> None:
    if not least <= low <= high:
        raise ValueError(f"need {least} <= min_{name} <= max_{name}, got {low}, {high}")


@st.composite
def _frames(draw, frame, rank_extra, min_classes, max_classes, max_extra_dims, min_scale, max_scale, rotate):
    _check_bounds("classes", min_classes, max_classes, 2)
    C = draw(st.integers(min_classes, max_classes))
    p = C + rank_extra + draw(st.integers(0, max_extra_dims))
    return frame(C, p, scale=draw(_scales(min_scale, max_scale)), rng=draw(_rotation_seed(rotate)))


def simplex_etfs(
    *,
    min_classes: int = 2,
    max_classes: int = 10,
    max_extra_dims: int = 3,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    rotate: bool = True,
) -> st.SearchStrategy[np.ndarray]:
    """Simplex ETFs as (C, p) rows: equal norms ``scale``, rows summing to zero, cosines -1/(C-1).

    C in [min_classes, max_classes], p = C-1 + [0, max_extra_dims], scale in [min_scale, max_scale]
    (default 1), and with ``rotate`` a Haar-random rotation (:func:`ufm.geometry.simplex_etf`).
    """
    return _frames(simplex_etf, -1, min_classes, max_classes, max_extra_dims, min_scale, max_scale, rotate)


def orthogonal_frames(
    *,
    min_classes: int = 2,
    max_classes: int = 10,
    max_extra_dims: int = 3,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    rotate: bool = True,
) -> st.SearchStrategy[np.ndarray]:
    """Orthogonal frames as (C, p) rows, p = C + [0, max_extra_dims], rows of norm ``scale``
    (:func:`ufm.geometry.orthogonal_frame`; the bias-free UFM minimizer's geometry)."""
    return _frames(
        orthogonal_frame, 0, min_classes, max_classes, max_extra_dims, min_scale, max_scale, rotate
    )


@dataclass(frozen=True, repr=False)
class CollapsedFeatures:
    """Features collapsed onto a frame: h_i = scale (F_{y_i} + noise z_i) + shift.

    Attributes
    ----------
    features : (n, p) one example per row, class-major.
    labels : (n,) classes 0..C-1.
    frame : (C, p) the unit frame F the class means sit on (before scaling and shift).
    scale : common norm of the centred class means (without noise).
    shift : (p,) the global mean mu_G added to every example.
    noise : standard deviation of the within-class noise, relative to ``scale`` (0: exact collapse;
        the class means then equal scale F_c + shift exactly).
    kind : "simplex_etf" or "orthogonal_frame".
    """

    features: np.ndarray
    labels: np.ndarray
    frame: np.ndarray
    scale: float
    shift: np.ndarray
    noise: float
    kind: str

    @property
    def C(self) -> int:
        return self.frame.shape[0]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.bincount(self.labels, minlength=self.C))

    def classifier(self, w_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(W (C, p), b (C,)): the self-dual classifier W = w_scale F with b = 1/C - W shift, whose
        outputs at the class means are 1/C + w_scale scale F F^T (NC3 and NC4 exact)."""
        W = w_scale * self.frame
        return W, 1.0 / self.C - W @ self.shift

    def __repr__(self) -> str:
        # What a shrunk counterexample needs, without pages of floats.
        return (
            f"CollapsedFeatures(kind={self.kind!r}, C={self.C}, counts={self.counts}, p={self.frame.shape[1]}, "
            f"scale={self.scale!r}, noise={self.noise!r}, |shift|={float(np.linalg.norm(self.shift)):.3g})"
        )


@st.composite
def collapsed_features(
    draw,
    *,
    min_classes: int = 2,
    max_classes: int = 8,
    min_per_class: int = 1,
    max_per_class: int = 4,
    balanced: bool | None = None,
    max_extra_dims: int = 3,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    min_noise: float = 0.0,
    max_noise: float = 0.0,
    max_shift: float = 0.0,
    rotate: bool = True,
    frame: str = "simplex_etf",
) -> CollapsedFeatures:
    """:class:`CollapsedFeatures` on a simplex ETF (or ``frame="orthogonal_frame"``).

    Parameters
    ----------
    min_classes, max_classes : bounds on C.
    min_per_class, max_per_class : bounds on each class's count.
    balanced : True (equal counts), False (counts drawn per class), None (either).
    max_extra_dims : p = rank of the frame + [0, max_extra_dims].
    min_scale, max_scale : bounds on the norm of the centred class means.
    min_noise, max_noise : bounds on the within-class noise's standard deviation, relative to the
        scale (default 0: exact collapse).
    max_shift : bound on each coordinate of the global mean, relative to the scale (default 0).
    rotate : allow a Haar-random rotation of the frame.

    Notes
    -----
    With equal counts the global mean mu_G is ``shift`` and every NC measure is 0 (to rounding). With
    unequal counts mu_G = shift + scale sum_c n_c F_c / n is not the frame's centre, so the centred
    means mu_c - mu_G (docs/theory.md §0.3) are not a simplex ETF: NC1 is 0, NC2 and NC3 are not.
    """
    makers = {"simplex_etf": (simplex_etf, -1), "orthogonal_frame": (orthogonal_frame, 0)}
    if frame not in makers:
        raise ValueError(f"frame must be one of {', '.join(makers)}, got {frame!r}")
    _check_bounds("per_class", min_per_class, max_per_class, 1)
    make, rank_extra = makers[frame]
    F = draw(_frames(make, rank_extra, min_classes, max_classes, max_extra_dims, 1.0, 1.0, rotate))
    C, p = F.shape
    if draw(st.booleans()) if balanced is None else not balanced:
        counts = draw(st.lists(st.integers(min_per_class, max_per_class), min_size=C, max_size=C))
    else:
        counts = [draw(st.integers(min_per_class, max_per_class))] * C
    scale = draw(_scales(min_scale, max_scale))
    if not 0 <= min_noise <= max_noise:
        raise ValueError(f"need 0 <= min_noise <= max_noise, got {min_noise}, {max_noise}")
    noise = draw(st.floats(min_noise, max_noise, allow_subnormal=False)) if max_noise > 0 else 0.0
    shift_elements = st.floats(-max_shift, max_shift, allow_nan=False) if max_shift > 0 else st.just(0.0)
    shift = scale * draw(hnp.arrays(np.float64, p, elements=shift_elements))
    labels = np.repeat(np.arange(C), counts)  # (n,) class-major
    H = scale * F[labels]  # (n, p)
    if noise > 0:
        H = H + scale * noise * np.random.default_rng(draw(_SEEDS)).standard_normal(H.shape)
    return CollapsedFeatures(H + shift, labels, F, float(scale), shift, float(noise), frame)


@st.composite
def ufm_problems(
    draw,
    *,
    min_classes: int = 2,
    max_classes: int = 6,
    min_per_class: int = 1,
    max_per_class: int = 4,
    balanced: bool | None = None,
    bias: bool | None = None,
    min_depth: int = 1,
    max_depth: int = 1,
    losses: tuple[str, ...] | None = None,
    activations: tuple[str, ...] = ("linear",),
    min_lam: float = 1e-3,
    max_lam: float = 0.5,
    max_label_smoothing: float = 0.0,
) -> UFMProblem:
    """:class:`ufm.UFMProblem` instances.

    Parameters
    ----------
    min_classes, max_classes, min_per_class, max_per_class : bounds on C and the class counts.
    balanced : True, False (per-class counts, not all equal unless drawn so) or None (either).
    bias : True, False or None (either).
    min_depth, max_depth : bounds on the number of weight layers after H.
    losses : names from ``ufm.losses.LOSSES`` to draw from (default: all).
    activations : ``"linear"`` and/or ``"relu"`` (used when depth > 1).
    min_lam, max_lam : bounds on lam_w (one per layer) and lam_h.
    max_label_smoothing : bound on a (default 0: one-hot targets).
    """
    _check_bounds("classes", min_classes, max_classes, 2)
    _check_bounds("per_class", min_per_class, max_per_class, 1)
    _check_bounds("depth", min_depth, max_depth, 1)
    losses = tuple(LOSSES) if losses is None else tuple(losses)
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses:
        raise ValueError(f"losses must be names from ufm.losses.LOSSES ({', '.join(LOSSES)}), got {losses}")
    if not 0 < min_lam <= max_lam:
        raise ValueError(f"need 0 < min_lam <= max_lam, got {min_lam}, {max_lam}")
    C = draw(st.integers(min_classes, max_classes))
    if draw(st.booleans()) if balanced is None else not balanced:
        N = tuple(draw(st.lists(st.integers(min_per_class, max_per_class), min_size=C, max_size=C)))
    else:
        N = draw(st.integers(min_per_class, max_per_class))
    depth = draw(st.integers(min_depth, max_depth))
    lams = st.floats(min_lam, max_lam, allow_nan=False)
    lam_w = tuple(draw(lams) for _ in range(depth))
    a = draw(st.floats(0.0, max_label_smoothing)) if max_label_smoothing > 0 else 0.0
    return UFMProblem(
        C, N, lam_w, draw(lams), bias=draw(st.booleans()) if bias is None else bias,
        loss=draw(st.sampled_from(losses)), depth=depth,
        activation=draw(st.sampled_from(activations)) if depth > 1 else "linear", label_smoothing=a,
    )  # fmt: skip


@st.composite
def ufm_params(
    draw, problem: UFMProblem, p: int | None = None, *, max_extra_dims: int = 3, max_abs: float = 2.0
) -> UFMParams:
    """A point (H, W_1..W_L, b) of ``problem`` with feature dimension ``p`` (default drawn in
    [C, C + max_extra_dims]) and entries in [-max_abs, max_abs] (shrinking to 0)."""
    if p is None:
        p = draw(st.integers(problem.C, problem.C + max_extra_dims))
    elements = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False)
    arr = lambda shape: draw(hnp.arrays(np.float64, shape, elements=elements))
    H = arr((p, problem.n))
    Ws = tuple(arr((p, p)) for _ in range(problem.depth - 1)) + (arr((problem.C, p)),)
    return UFMParams(H, Ws, arr((problem.C,)) if problem.bias else None)


st.register_type_strategy(UFMProblem, ufm_problems())


# ---------------------------------------------------------------- assertions
def assert_simplex_etf(M: Any, *, atol: float = 1e-8) -> None:
    """Assert that the rows of ``M`` (C, p) form a simplex ETF of any common norm (docs/theory.md §1):
    equal norms, rows summing to zero, pairwise cosines -1/(C-1); norms and the sum are compared
    relative to the mean norm. The AssertionError names the first property that fails and by how much.
    """
    atol = check_nonneg("atol", atol)  # a NaN tolerance would pass every comparison below
    M = np.asarray(M, dtype=float)
    if M.ndim != 2 or M.shape[0] < 2:
        raise AssertionError(f"a simplex ETF needs a (C, p) matrix of C >= 2 rows, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise AssertionError("not a simplex ETF: M has non-finite entries")
    C, p = M.shape
    if p < C - 1:
        raise AssertionError(f"not a simplex ETF: {C} rows need p >= C-1 = {C - 1} columns, got p = {p}")
    norms = np.linalg.norm(M, axis=1)
    mean = float(norms.mean())
    if mean == 0:
        raise AssertionError("not a simplex ETF: every row is zero")
    worst = int(np.argmax(np.abs(norms - mean)))
    if abs(norms[worst] - mean) / mean > atol:
        raise AssertionError(
            f"not a simplex ETF: unequal norms, row {worst} has norm {norms[worst]:.6g}, the mean is "
            f"{mean:.6g} (relative deviation {abs(norms[worst] - mean) / mean:.3g} > atol {atol:g})"
        )
    total = float(np.linalg.norm(M.sum(axis=0))) / mean
    if total > atol:
        raise AssertionError(
            f"not a simplex ETF: rows do not sum to zero, |sum of rows| / mean norm = {total:.3g} > atol {atol:g}"
        )
    U = M / norms[:, None]
    cos = U @ U.T
    dev = np.abs(cos + 1.0 / (C - 1))
    np.fill_diagonal(dev, 0.0)
    i, j = np.unravel_index(int(np.argmax(dev)), dev.shape)
    if dev[i, j] > atol:
        raise AssertionError(
            f"not a simplex ETF: cos(row {i}, row {j}) = {cos[i, j]:.6g}, not -1/(C-1) = "
            f"{-1 / (C - 1):.6g} (off by {dev[i, j]:.3g} > atol {atol:g})"
        )


# The measures that vanish under exact collapse, with what each measures (docs/theory.md §0.3-0.4).
COLLAPSE_MEASURES = {
    "nc1": "NC1, within-class variability Tr(Sigma_W Sigma_B^+)/C",
    "nc2_equinorm": "NC2, unequal norms of the centred class means",
    "nc2_equiangle": "NC2, spread of the class means' cosines",
    "nc2_maxangle": "NC2, class means' cosines off -1/(C-1)",
    "nc2_equinorm_w": "NC2, unequal norms of the classifier rows",
    "nc2_equiangle_w": "NC2, spread of the classifier rows' cosines",
    "nc2_maxangle_w": "NC2, classifier rows' cosines off -1/(C-1)",
    "nc3": "NC3, classifier rows not aligned with the class means",
    "nc4": "NC4, fraction of decisions differing from nearest class mean",
}


def assert_collapsed(metrics: NCMetrics, *, atol: float = 1e-8) -> None:
    """Assert neural collapse: every measure of ``COLLAPSE_MEASURES`` that ``metrics`` has (those needing
    W are None without one) is at most ``atol``. The AssertionError lists each one that is not, with
    its value."""
    if not isinstance(metrics, NCMetrics):
        raise TypeError(f"assert_collapsed takes ufm.NCMetrics, got {type(metrics).__name__}")
    atol = check_nonneg("atol", atol)
    failed = []
    for key, meaning in COLLAPSE_MEASURES.items():
        value = getattr(metrics, key)
        if value is not None and not abs(value) <= atol:
            failed.append(f"{key} = {value:.3g} ({meaning})")
    if failed:
        raise AssertionError(
            f"not collapsed (atol {atol:g}, C = {metrics.C}, n = {metrics.n}, p = {metrics.p}): "
            + "; ".join(failed)
        )
