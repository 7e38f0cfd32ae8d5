"""The collapse-time study of ``ufm reproduce`` (ufm.experiments.collapse_time)."""

import numpy as np
import pytest

from ufm.experiments import collapse_time as ct


def test_collapse_time_is_the_first_time_from_which_both_hold():
    t = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    loss = 1.0 + np.array([1.0, 1e-7, 1e-5, 1e-7, 0.0])  # dips below, leaves, then stays
    nc1 = np.array([1.0, 1e-4, 1e-4, 1e-4, 1e-5])
    assert ct._collapse_time(t, loss, nc1, 1.0) == 3.0
    assert ct._collapse_time(t, loss, np.full(5, 1.0), 1.0) is None


def test_measured_collapse_time_follows_the_slow_mode():
    """T of one moment flow from a random start lies within 15% of the slow mode's prediction
    ln(lam tr S_0 (p - C + 1)/p / (2 rtol L*))/(2 lam) (module docstring), and the loss ends at the
    closed form."""
    row = ct._one(3, 8, 6, 1e-2, seed=0)
    assert row["T_collapse"] is not None
    assert row["T_collapse"] == pytest.approx(row["T_pred"], rel=0.15)
    assert 0 <= row["loss_rel_err"] < ct.LOSS_RTOL
