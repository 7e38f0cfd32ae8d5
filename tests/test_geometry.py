"""Frames (docs/theory.md §1) and distances from them."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from problems import helmert_etf, procrustes_distance

from ufm.geometry import frame_distance, frame_gram, orthogonal_frame, simplex_etf
from ufm.testing import assert_simplex_etf, orthogonal_frames, simplex_etfs

TOL = 1e-12  # float64 round-off on O(1) entries, with room for C up to 60


@given(E=simplex_etfs(max_classes=60, max_extra_dims=5, min_scale=1e-3, max_scale=1e3))
def test_simplex_etf_properties(E):
    """Statement 1: unit (here: equal to scale) norms, Gram C/(C-1)(I - 11^T/C), cosines -1/(C-1), any p >= C-1."""
    C = E.shape[0]
    scale = np.linalg.norm(E[0])
    assert E.shape[1] >= C - 1
    gram = E @ E.T / scale**2
    np.testing.assert_allclose(gram, C / (C - 1) * (np.eye(C) - 1.0 / C), atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), scale, rtol=TOL)
    cos = gram[~np.eye(C, dtype=bool)]
    np.testing.assert_allclose(cos, -1.0 / (C - 1), atol=TOL)
    np.testing.assert_allclose(E.sum(axis=0), 0.0, atol=TOL * scale * C)
    assert frame_distance(E) < 1e-6  # sqrt of round-off
    assert_simplex_etf(E, atol=TOL)


@given(F=orthogonal_frames(max_classes=40, max_extra_dims=5))
def test_orthogonal_frame(F):
    C = F.shape[0]
    np.testing.assert_allclose(F @ F.T, np.eye(C), atol=TOL)
    np.testing.assert_allclose(frame_gram(C, "orthogonal_frame"), np.eye(C))
    assert frame_distance(F, "orthogonal_frame") < 1e-6


@given(
    C=st.integers(2, 12),
    extra=st.integers(0, 3),
    frame=st.sampled_from(["simplex_etf", "orthogonal_frame"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_frame_distance_is_procrustes(C, extra, frame, seed):
    """The closed form sqrt(2 - 2 ||F^T V||_* / ||V||_F) equals the residual of an explicit orthogonal
    Procrustes solve against a frame typed out in tests/problems.py (Helmert ETF or I/sqrt(C)), from
    the smallest dimension that holds the frame (p = C-1 or C) up."""
    k = C - 1 if frame == "simplex_etf" else C
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((C, k + extra))
    direct = procrustes_distance(V, frame)
    assert frame_distance(V, frame) == pytest.approx(direct, abs=1e-10)
    # Any other map with orthonormal rows is no closer.
    F = helmert_etf(C) / np.sqrt(C - 1) if frame == "simplex_etf" else np.eye(C) / np.sqrt(C)
    Q = np.linalg.qr(rng.standard_normal((k + extra, k)))[0].T  # (k, p), orthonormal rows
    assert np.linalg.norm(V / np.linalg.norm(V) - F @ Q) >= direct - 1e-12


@given(C=st.integers(2, 30))
def test_typed_helmert_frame_is_the_library_etf(C):
    """The typed-out Helmert rows have the ETF's Gram I - 11^T/C, and frame_distance puts them (and
    the library's own ETF) at distance 0 from it: the two frames agree up to rotation and scale."""
    B = helmert_etf(C)
    np.testing.assert_allclose(B @ B.T, np.eye(C) - 1.0 / C, atol=TOL)
    assert frame_distance(B) < 1e-6  # sqrt of round-off
    assert procrustes_distance(simplex_etf(C, C + 1, rng=C), "simplex_etf") < 1e-12


def test_frames_are_distinct():
    """An orthogonal frame is not an ETF and vice versa (the distance can fail)."""
    assert frame_distance(orthogonal_frame(5)) > 0.1
    assert frame_distance(simplex_etf(5, 5), "orthogonal_frame") > 0.1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: simplex_etf(5, 3), "p >= C-1"),
        (lambda: simplex_etf(1), "C must be an integer >= 2"),
        (lambda: orthogonal_frame(5, 4), "p >= C"),
        (lambda: frame_distance(np.ones((4, 2))), "p >= C-1"),
        (lambda: frame_distance(np.zeros((4, 5))), "all zero"),
        (lambda: frame_distance(np.full((4, 5), np.nan)), "non-finite"),
        (lambda: frame_distance(np.ones((4, 5)), "hexagon"), "unknown frame"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_simplex_etf_returns_a_fresh_array_each_call():
    """The canonical rows are cached per C: a caller writing into its result changes neither the next
    call's result nor frame_distance, which reads the cache (Gram typed out: C/(C-1) (I - J/C))."""
    C = 5
    first = simplex_etf(C)
    first[...] = 0.0
    again = simplex_etf(C)
    np.testing.assert_allclose(again @ again.T, C / (C - 1) * (np.eye(C) - 1.0 / C), atol=1e-14)
    assert frame_distance(again) == pytest.approx(0.0, abs=1e-7)
