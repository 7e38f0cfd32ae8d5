"""The fixed batch order of training, and the SGD-noise decomposition (docs/theory.md §16.3)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ufm.experiments.sgd_noise import (
    _EpochMoments,
    detrended_split,
    sampling_part,
    sgd_noise_experiment,
    sgd_noise_section,
)
from ufm.tables import read_csv
from ufm.training import TrainConfig, _epoch_order, _TrainState, train

TINY = dict(per_class=10, test_per_class=5, width=16, depth=3, batch_size=10, epochs=4, lr=0.05, device="cpu")


def _split_of(stream: np.ndarray):
    """Feed a stream (K, m, d) through one _EpochMoments per epoch and split it."""
    K, m, _ = stream.shape
    epochs = []
    for e in range(K):
        t = _EpochMoments(m)
        for x in stream[e]:
            t.add(torch.from_numpy(x))
        epochs.append(t)
    means = np.stack([t.mean.numpy() for t in epochs])
    covs = np.stack([t.C.numpy() for t in epochs])
    return detrended_split(means, covs, np.array([float(t.m2.sum()) for t in epochs]), m)


def test_split_of_a_typed_out_stream():
    """x_t = 0.5 t + p_{t mod 3} + o_e over K = 3 epochs of m = 3 steps, p = o = (1, -2, 1): both
    are orthogonal to the line a + b t, so the detrended stream is p + o exactly. Within each epoch
    1/3 sum p^2 = 2; between 1/3 sum o^2 = 2; the mean is 0.5 * 4 = 2; the slope 0.5 is removed,
    0.5 * 3 / 2 = 0.75 per epoch relative to the mean. A second coordinate 3x the first scales the
    sums of squares by 1 + 9 = 10."""
    p = o = np.array([1.0, -2.0, 1.0])
    t = np.arange(9).reshape(3, 3)
    x = 0.5 * t + p[None, :] + o[:, None]  # (K, m)
    s = _split_of(np.stack([x, 3 * x], axis=-1))
    np.testing.assert_allclose(s.within, [20.0, 20.0, 20.0], rtol=1e-12)
    assert s.between == pytest.approx(20.0, rel=1e-12)
    assert s.mean_sq == pytest.approx(40.0, rel=1e-12)
    assert s.total_sq == pytest.approx(1.0, rel=1e-12)
    assert s.drift == pytest.approx(0.75, rel=1e-12)


def test_split_against_a_stored_least_squares_fit():
    """A random stream with a trend, against np.polyfit's line per coordinate on the stored stream
    and the textbook within/between sums of squares of its residuals."""
    rng = np.random.default_rng(1)
    K, m, d = 5, 7, 4
    t = np.arange(K * m)
    stream = (
        2.0 + 0.01 * t[:, None] * rng.normal(size=d) + rng.normal(size=(K * m, d)) * rng.uniform(0.1, 1, d)
    )
    stream[:, 0] += np.repeat(rng.normal(size=K), m)  # epoch offsets
    resid = np.stack([stream[:, j] - np.polyval(np.polyfit(t, stream[:, j], 1), t) for j in range(d)], 1)
    r = resid.reshape(K, m, d)
    within = ((r - r.mean(1, keepdims=True)) ** 2).sum(axis=(1, 2)) / m
    between = (r.mean(1) ** 2).sum(1).mean()
    s = _split_of(stream.reshape(K, m, d))
    np.testing.assert_allclose(s.within, within, rtol=1e-9)
    assert s.between == pytest.approx(between, rel=1e-9)
    assert s.total_sq * s.mean_sq == pytest.approx((resid**2).sum() / (K * m), rel=1e-9)


def test_sampling_part():
    # sqrt(5 - 4) = 1, 10 standard errors (0.1) above zero; 0.1 is 0.1 standard errors: not distinguishable
    assert sampling_part(5.0, 4.0, 0.01) == pytest.approx(1.0)
    assert sampling_part(4.1, 4.0, 1.0) is None
    assert sampling_part(3.0, 4.0, 0.01) is None


def test_fixed_order_repeats_the_first_shuffled_epoch():
    """batch_order="fixed" uses the permutation that "shuffle" draws first, every epoch."""
    from ufm.datasets import load_dataset

    data = load_dataset("default", per_class=10, test_per_class=5)
    fixed, shuffle = (TrainConfig(**TINY, batch_order=o) for o in ("fixed", "shuffle"))
    sf, ss = (_TrainState.start(c, data, torch.device("cpu")) for c in (fixed, shuffle))
    n = 100
    first = _epoch_order(ss, shuffle, n)
    assert torch.equal(_epoch_order(sf, fixed, n), first) and torch.equal(_epoch_order(sf, fixed, n), first)
    assert not torch.equal(_epoch_order(ss, shuffle, n), first)
    assert sorted(first.tolist()) == list(range(n))


def test_fixed_order_training_resumes_bit_identically(tmp_path):
    """A fixed-order run stopped after epoch 2 and resumed equals the uninterrupted run; it equals the
    shuffled run in epoch 1 (same order) and not later; a shuffled checkpoint is not resumed as fixed."""
    config = TrainConfig(**TINY, batch_order="fixed")
    whole = train(config, progress=False)
    train(config, out=tmp_path / "a", progress=False, stop_after_epoch=2)
    resumed = train(config, out=tmp_path / "a", resume=True, progress=False)
    for key in ("train_loss", "nc1", "norm_W1"):
        np.testing.assert_array_equal(whole.history[key], resumed.history[key])
    shuffled = train(TrainConfig(**TINY), out=tmp_path / "b", progress=False, stop_after_epoch=2)
    assert shuffled.history["train_loss"][1] == whole.history["train_loss"][1]
    assert shuffled.history["train_loss"][2] != whole.history["train_loss"][2]
    with pytest.raises(ValueError, match="batch_order"):
        train(config, out=tmp_path / "b", resume=True, progress=False)


def test_batch_order_is_validated_and_on_the_cli():
    with pytest.raises(ValueError, match="batch_order.*'shuffle', 'fixed'"):
        TrainConfig(batch_order="random")
    run = [sys.executable, "-m", "ufm", "train", "--batch-order"]
    shown = subprocess.run([*run, "fixed", "--show-defaults"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and json.loads(shown.stdout)["batch_order"] == "fixed"
    bad = subprocess.run([*run, "random", "--show-defaults"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--batch-order" in bad.stderr


def test_bad_sweeps_and_a_run_without_checkpoint_are_refused(tmp_path):
    train(TrainConfig(**(TINY | {"epochs": 1})), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch size 30 does not divide the 100 training examples"):
        sgd_noise_experiment([tmp_path], lr_factors=(1,), batch_sizes=(30,))
    with pytest.raises(ValueError, match="positive lr_factors"):
        sgd_noise_experiment([tmp_path], lr_factors=(0,), batch_sizes=(10,))
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        sgd_noise_experiment([tmp_path], lr_factors=(1,), batch_sizes=(10,))


def test_tiny_experiment_writes_its_tables_and_section(tmp_path):
    """The experiment on networks it trains itself: one row per (weight decay, sweep point, quantity),
    the burn-in and window rules in steps, and the report section quoting the table."""
    res = sgd_noise_experiment(
        quick=True, out=tmp_path, wds=(5e-3,), lr_factors=(1, 4), batch_sizes=(10, 20), **TINY
    )  # fmt: skip
    rows = read_csv(res.table)
    # (2 learning rates + 2 batch sizes) x (W1, W2, W3, out)
    assert len(rows) == 4 * 4 and {r["quantity"] for r in rows} == {"W1", "W2", "W3", "out"}
    for r in rows:
        assert r["steps_per_epoch"] * r["batch_size"] == 100
        assert 100 <= r["burn_in_steps"] < 100 + r["steps_per_epoch"]
        assert r["window_epochs"] >= 6 and r["window_steps"] >= 120
        assert r["fixed"] > 0 and r["total"] > 0
        assert r["sampling"] is None or r["sampling"] == pytest.approx(
            np.sqrt(r["total"] ** 2 - r["fixed"] ** 2)
        )
    assert read_csv(res.exponents_table) and res.figure.read_bytes()[:4] == b"\x89PNG"
    text = sgd_noise_section(tmp_path)
    base = next(r for r in rows if r["quantity"] == "out" and r["sweep"] == "lr")
    assert f"{base['fixed']:.3g}" in text and "![SGD noise](sgd_noise.png)" in text
