"""Progress where a person watches: the flow's bar measures the way to the nearest stopping rule."""

import pytest

from ufm.dynamics.flow import _Progress


def _bar(**limits):
    return _Progress(
        False, "flow", **({"tol": 1e-8, "t_max": 1e6, "max_nfev": 10**6, "max_seconds": 1e4} | limits)
    )


def test_share_follows_the_stationarity_on_a_log_scale():
    """From ||grad|| = 1 down to tol = 1e-8, 1e-4 is half way (log scale), not t/t_max ~ 0."""
    bar = _bar()
    assert bar.share(0.0, 1.0, 0, 0.0) == 0.0
    assert bar.share(10.0, 1e-4, 100, 0.1) == pytest.approx(0.5)
    assert bar.share(20.0, 1e-8, 200, 0.2) == pytest.approx(1.0)


def test_share_follows_the_budget_that_stops_first():
    bar = _bar(max_nfev=1000)
    bar.share(0.0, 1.0, 0, 0.0)
    assert bar.share(1.0, 0.5, 750, 0.0) == pytest.approx(0.75)  # nfev 750 of 1000; stationarity ~4%
    bar = _bar(t_max=10.0)
    bar.share(0.0, 1.0, 0, 0.0)
    assert bar.share(5.0, 0.9, 10, 0.0) == pytest.approx(0.5)
