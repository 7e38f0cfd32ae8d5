"""ufm.testing: its strategies draw what they promise (checked against typed-out formulas), its
assertions fail with messages naming the property and the size of the failure, and shrunk
counterexamples stay readable."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import find, given
from hypothesis import strategies as st

import ufm
from ufm import nc_metrics, simplex_etf
from ufm.testing import (
    CollapsedFeatures,
    assert_collapsed,
    assert_simplex_etf,
    collapsed_features,
    orthogonal_frames,
    simplex_etfs,
    ufm_params,
    ufm_problems,
)

TOL = 1e-12


@given(simplex_etfs(min_classes=3, max_classes=7, max_extra_dims=2, min_scale=0.5, max_scale=4.0))
def test_simplex_etfs_have_the_typed_gram(E):
    """Gram of a simplex ETF with row norm s: s^2 C/(C-1) (I - J/C) (docs/theory.md §1)."""
    C, p = E.shape
    assert 3 <= C <= 7 and C - 1 <= p <= C + 1
    s2 = np.sum(E[0] ** 2)
    assert 0.25 - TOL <= s2 <= 16 + TOL
    np.testing.assert_allclose(E @ E.T, s2 * C / (C - 1) * (np.eye(C) - 1 / C), atol=TOL * 16)


@given(orthogonal_frames(max_classes=6))
def test_orthogonal_frames_are_orthonormal(F):
    C, p = F.shape
    assert p >= C
    np.testing.assert_allclose(F @ F.T, np.eye(C), atol=TOL)


@given(collapsed_features(max_noise=0.0, max_shift=3.0, min_scale=0.1, max_scale=10.0, balanced=True))
def test_collapsed_features_sit_on_the_frame(d):
    """Without noise every example is scale F_y + shift, the counts are equal, and every NC measure
    vanishes (NC1-NC4 by their definitions at exact collapse)."""
    n, p = d.features.shape
    assert d.labels.shape == (n,) and len(set(d.counts)) == 1
    np.testing.assert_allclose(d.features, d.scale * d.frame[d.labels] + d.shift, atol=TOL * 100)
    assert_collapsed(nc_metrics(d.features, d.labels, *d.classifier(2.0)), atol=1e-9)


@given(collapsed_features(min_per_class=2, max_per_class=6, balanced=False, min_noise=0.01, max_noise=0.5))
def test_collapsed_features_counts_and_noise(d):
    """Gaussian noise of relative size s: the within-class deviations have RMS about s scale."""
    assert all(2 <= c <= 6 for c in d.counts) and 0.01 <= d.noise <= 0.5
    spread = d.features - (d.scale * d.frame[d.labels] + d.shift)
    # An RMS of n p >= 4 standard normals times s: between s/10 and 3 s with overwhelming probability.
    assert 0.1 * d.noise * d.scale < np.sqrt(np.mean(spread**2)) < 3 * d.noise * d.scale


@given(ufm_problems(min_classes=3, max_classes=5, max_per_class=3, min_depth=2, max_depth=3, bias=False,
                    losses=("ce",), max_label_smoothing=0.2))  # fmt: skip
def test_ufm_problems_respect_their_bounds(problem):
    assert 3 <= problem.C <= 5 and all(1 <= c <= 3 for c in problem.counts)
    assert 2 <= problem.depth <= 3 and not problem.bias and 0 <= problem.label_smoothing <= 0.2
    assert type(problem.loss) is ufm.CrossEntropy


@given(st.data())
def test_ufm_params_fit_their_problem(data):
    """Parameters drawn for a problem have its shapes, so the loss and its gradient are defined."""
    problem = data.draw(ufm_problems(max_depth=2))
    params = data.draw(ufm_params(problem, 5, max_abs=1.0))
    assert params.H.shape == (5, problem.n) and params.W.shape == (problem.C, 5)
    assert (params.b is not None) == problem.bias and len(params.Ws) == problem.depth
    value, grad = ufm.loss_and_grad(problem, params)
    assert np.isfinite(value) and grad.H.shape == params.H.shape


@given(st.from_type(ufm.UFMProblem))
def test_from_type_draws_problems(problem):
    assert isinstance(problem, ufm.UFMProblem)


def test_etf_assertion_names_the_property_and_the_amount():
    E = ufm.simplex_etf(4, 5, rng=3)
    assert_simplex_etf(E, atol=1e-12)
    longer = E.copy()
    longer[2] *= 1.2  # norms 1, 1, 1.2, 1: mean 1.05, row 2 off by 0.15/1.05
    with pytest.raises(AssertionError, match=r"unequal norms, row 2 .*relative deviation 0\.143"):
        assert_simplex_etf(longer)
    # + 0.5 v on every row, v a unit vector orthogonal to the rows: norms all sqrt(1.25), sum 2 v,
    # so |sum| / mean norm = 2 / sqrt(1.25) = 1.78885.
    v = np.linalg.svd(E)[2][-1]
    with pytest.raises(AssertionError, match=r"rows do not sum to zero, \|sum of rows\| / mean norm = 1\.79"):
        assert_simplex_etf(E + 0.5 * v)
    # Equal norms and zero sum, but the wrong angles: 4 unit vectors +-e1, +-e2 have cosines 0 and -1.
    square = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    with pytest.raises(AssertionError, match=r"cos\(row 0, row 1\) = -1, not -1/\(C-1\) = -0\.333333"):
        assert_simplex_etf(square)
    with pytest.raises(AssertionError, match="p >= C-1 = 3"):
        assert_simplex_etf(np.ones((4, 2)))


def test_collapse_assertion_lists_every_failure():
    rng = np.random.default_rng(0)
    H, y = rng.standard_normal((40, 5)), np.arange(40) % 4
    m = nc_metrics(H, y, rng.standard_normal((4, 5)))
    with pytest.raises(AssertionError) as info:
        assert_collapsed(m, atol=1e-6)
    text = str(info.value)
    for key in ("nc1", "nc2_equinorm", "nc3"):
        assert f"{key} = {getattr(m, key):.3g}" in text
    # Without a classifier the W measures are absent (None), not failures.
    with pytest.raises(AssertionError) as info:
        assert_collapsed(nc_metrics(H, y), atol=1e-6)
    assert "nc3" not in str(info.value) and "nc1" in str(info.value)


@pytest.mark.parametrize("atol", [float("nan"), -1.0, float("inf")])
def test_a_tolerance_that_cannot_fail_is_refused(atol):
    """Before: atol = NaN passed every comparison, so both assertions accepted anything (M + 1, random
    features); a negative one failed an exact ETF with a message about unequal norms."""
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="^atol must be a finite number >= 0"):
        assert_simplex_etf(simplex_etf(4, 6) + 1, atol=atol)
    with pytest.raises(ValueError, match="^atol must be a finite number >= 0"):
        assert_collapsed(nc_metrics(rng.standard_normal((12, 5)), np.arange(12) % 4), atol=atol)


def test_shrunk_counterexample_is_readable():
    """A false property shrinks to the smallest case, and its repr fits on one line."""
    found = find(collapsed_features(max_noise=0.3), lambda d: d.noise > 0 and d.C > 2)
    assert isinstance(found, CollapsedFeatures) and found.C == 3 and found.counts == (1, 1, 1)
    assert len(repr(found)) < 150 and "\n" not in repr(found)
    assert find(simplex_etfs(), lambda E: E.shape[0] >= 3).shape == (3, 2)


def test_bad_bounds_are_clear_errors():
    with pytest.raises(ValueError, match="min_classes"):
        find(simplex_etfs(min_classes=1), lambda E: True)
    with pytest.raises(ValueError, match="losses must be names"):
        find(ufm_problems(losses=("hinge",)), lambda problem: True)


def test_import_ufm_does_not_import_hypothesis():
    code = "import sys, ufm; ufm.UFMProblem; assert 'hypothesis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
