"""Property tests of your own, built on ufm.testing (hypothesis strategies and assertions).

    pytest examples/test_my_properties.py

Each test states the theorem it checks. The strategies draw ufm's objects with keyword bounds and
shrink to the smallest case (two classes, one example each, no rotation), so a failure reads as a
small counterexample; the assertions say which property failed and by how much.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import ufm
from ufm.testing import (
    assert_collapsed,
    assert_simplex_etf,
    collapsed_features,
    simplex_etfs,
    ufm_params,
    ufm_problems,
)

FAST = settings(max_examples=20, deadline=None)


@FAST
@given(simplex_etfs(max_classes=8), st.floats(0.1, 10.0))
def test_scaled_etf_is_an_etf(M, c):
    """docs/theory.md §1: scaling a simplex ETF keeps it one (equal norms, zero sum, cosines -1/(C-1))."""
    assert_simplex_etf(c * M, atol=1e-9)


@FAST
@given(collapsed_features(max_classes=6, min_scale=0.1, max_scale=10.0, max_shift=2.0, balanced=True))
def test_exact_collapse_is_measured_as_collapse(data):
    """docs/theory.md §0.4: features on their class means, a simplex ETF, with the self-dual
    classifier give NC1 = NC2 = NC3 = NC4 = 0."""
    metrics = ufm.nc_metrics(data.features, data.labels, *data.classifier())
    assert_collapsed(metrics, atol=1e-8)


@FAST
@given(st.data())
def test_rotating_features_and_classifier_keeps_the_loss(data):
    """docs/theory.md §0.1: H -> Q H, W -> W Q^T (Q orthogonal) leaves W H, hence the loss, unchanged."""
    problem = data.draw(ufm_problems(max_classes=4, max_depth=1))
    params = data.draw(ufm_params(problem, 5))
    Q = np.linalg.qr(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((5, 5)))[0]
    rotated = ufm.UFMParams(Q @ params.H, (params.W @ Q.T,), params.b)  # depth 1: one layer, W
    before, after = ufm.loss(problem, params), ufm.loss(problem, rotated)
    assert abs(after - before) <= 1e-9 * (1 + abs(before))
