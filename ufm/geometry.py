"""Frames that neural collapse converges to, and distances from them.

Convention: a frame is stored as **rows**, one vector per class, shape (C, p), like the classifier
W (C, p) and like the class means stacked as rows. The M of docs/theory.md §0.3 (p x C, columns) is the transpose.

Frames
------
* Simplex ETF (docs/theory.md §1): for P in R^{p x C'} with orthonormal columns,
  ``sqrt(C/(C-1)) P (I - 11^T/C)`` has unit columns, Gram ``C/(C-1) (I - 11^T/C)`` and pairwise
  cosines ``-1/(C-1)``. It spans C-1 dimensions, so it exists in any p >= C-1.
* Orthogonal frame: C orthonormal vectors, p >= C (the bias-free MSE minimizer's geometry).
"""

from __future__ import annotations

import functools

import numpy as np

from ._validation import check_choice, check_classes, check_finite, check_positive_int

FRAMES = ("simplex_etf", "orthogonal_frame")


def _frame_rank(C: int, frame: str) -> int:
    """Dimension spanned by the frame: C-1 for the simplex ETF, C for the orthogonal frame."""
    check_choice("frame", frame, FRAMES)
    return C - 1 if frame == "simplex_etf" else C


def _random_orthonormal_rows(k: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """(k, p) with orthonormal rows, Haar-distributed (QR of a Gaussian with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((p, k)))
    return (q * np.sign(np.diag(r))).T


def _embedding(k: int, p: int, rng: np.random.Generator | int | None) -> np.ndarray:
    """(k, p) orthonormal rows: the first k coordinate axes, or a random rotation when rng is given."""
    if rng is None:
        return np.eye(k, p)
    return _random_orthonormal_rows(k, p, np.random.default_rng(rng))


def simplex_etf(
    C: int, p: int | None = None, *, scale: float = 1.0, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Simplex equiangular tight frame of C unit vectors in R^p, as rows (C, p).

    Rows have norm ``scale``, sum to zero, and have pairwise cosine -1/(C-1) (docs/theory.md §1).

    Parameters
    ----------
    C : number of classes, C >= 2.
    p : ambient dimension, p >= C-1 (default C-1).
    scale : common norm of the rows.
    rng : None for the canonical embedding (first C-1 axes); a seed or Generator for a Haar-random
        rotation of it.
    """
    C = check_classes(C)
    p = C - 1 if p is None else check_positive_int("p", p)
    if p < C - 1:
        raise ValueError(f"a simplex ETF of C={C} vectors needs p >= C-1 = {C - 1}, got p={p}")
    return scale * _canonical_simplex(C) @ _embedding(C - 1, p, rng)


@functools.lru_cache(maxsize=64)
def _canonical_simplex(C: int) -> np.ndarray:
    """The simplex ETF's C unit rows in R^{C-1} (C, C-1), read-only: made once per C, since a build
    takes an SVD of a C x C matrix (0.95 ms at C = 100)."""
    # Orthonormal basis of 1^perp in R^C: the last C-1 left singular vectors of the centring matrix.
    centring = np.eye(C) - 1.0 / C  # (C, C)
    basis = np.linalg.svd(centring)[0][:, : C - 1]  # (C, C-1), columns span 1^perp
    rows = np.sqrt(C / (C - 1)) * centring @ basis  # (C, C-1), unit rows, cos -1/(C-1)
    rows.flags.writeable = False
    return rows


def orthogonal_frame(
    C: int, p: int | None = None, *, scale: float = 1.0, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """C orthonormal vectors in R^p (p >= C), times ``scale``, as rows (C, p)."""
    C = check_classes(C)
    p = C if p is None else check_positive_int("p", p)
    if p < C:
        raise ValueError(f"an orthogonal frame of C={C} vectors needs p >= C, got p={p}")
    return scale * _embedding(C, p, rng)


def frame_gram(C: int, frame: str = "simplex_etf") -> np.ndarray:
    """Gram matrix (C, C) of the unit-norm frame: C/(C-1)(I - 11^T/C) for the ETF, I for the orthogonal one."""
    C = check_classes(C)
    if _frame_rank(C, frame) == C:
        return np.eye(C)
    return C / (C - 1) * (np.eye(C) - 1.0 / C)


def frame_distance(vectors: np.ndarray, frame: str = "simplex_etf") -> float:
    """Distance of C vectors (rows, (C, p)) from the nearest frame of the given kind.

    Both are scaled to unit Frobenius norm, and the frame is free to rotate (any orthogonal map):

        d = min_Q || V/||V||_F - F Q ||_F = sqrt(2 - 2 ||F^T V||_* / ||V||_F),

    with F the canonical unit-Frobenius frame (C, k), k = C-1 (ETF) or C (orthogonal); the minimum
    over Q with orthonormal rows is the orthogonal Procrustes problem. d = 0 exactly when V is a
    scaled, rotated copy of the frame; d <= 2 always. Since the ETF's symmetry group permutes its
    vertices, the labelling of the rows does not matter.

    No frame is built: F F^T is (I - 11^T/C)/(C-1) for the ETF and I/C for the orthogonal frame, so
    ||F^T V||_* = ||(I - 11^T/C) V||_* / sqrt(C-1) (the rows less their mean) or ||V||_* / sqrt(C)
    (docs/theory.md §1): one singular-value computation of V, (C, p).
    """
    V = check_finite("vectors", vectors)
    if V.ndim != 2:
        raise ValueError(f"vectors must be a (C, p) array of rows, got shape {V.shape}")
    C, p = V.shape
    C = check_classes(C)
    k = _frame_rank(C, frame)
    if p < k:
        need = "C-1" if frame == "simplex_etf" else "C"
        raise ValueError(f"{frame} distance of C={C} vectors needs p >= {need} = {k}, got p={p}")
    norm = np.linalg.norm(V)
    if norm == 0:
        raise ValueError("vectors are all zero: the distance to a frame is undefined")
    seen = V - V.mean(axis=0) if k == C - 1 else V  # (C, p): ||F^T V||_* = ||seen||_* / sqrt(k)
    nuclear = np.linalg.svd(seen, compute_uv=False).sum() / (np.sqrt(k) * norm)
    return float(np.sqrt(max(2.0 - 2.0 * nuclear, 0.0)))


def mean_cosine(vectors: np.ndarray) -> float:
    """Mean cosine between distinct rows of ``vectors`` (C, p): -1/(C-1) for a simplex ETF, 0 for an
    orthogonal frame; NaN when a row is zero (it has no direction)."""
    V = check_finite("vectors", vectors)
    C = V.shape[0]
    norms = np.linalg.norm(V, axis=1)
    if C < 2 or np.any(norms == 0):
        return float("nan")
    U = V / norms[:, None]
    G = U @ U.T
    return float((G.sum() - np.trace(G)) / (C * (C - 1)))
