"""ufm.sqi_deviation (docs/theory.md §12): the exact parts of the theorem's errors and their bounds.

References: the gradient by torch autograd, the theorem's predictions typed out, the ridge solution
W = T^T H (H^T H + n lam I)^{-1} (the exact critical point of the last layer for fixed features).
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from ufm.proofs import verify
from ufm.sqi_deviation import sqi_bounds

# Identities are exact up to float64 rounding of O(1)-sized sums.
IDENTITY_RTOL = 1e-10


def _problem(rng, C, N, p, *, offset=2.0):
    labels = np.repeat(np.arange(C), N)
    H = rng.normal(size=(C * N, p)) + offset
    return labels, H


def _targets(labels, C, a):
    return (1 - a) * np.eye(C)[labels] + a / C


def _ridge(H, T, lam):
    """The critical point of the last layer for fixed features: G = 0 exactly."""
    n, p = H.shape
    return np.linalg.solve(H.T @ H + n * lam * np.eye(p), H.T @ T).T


def _autograd_gradient(W, H, T, lam):
    Wt = torch.tensor(W, requires_grad=True)
    Ht, Tt = torch.tensor(H), torch.tensor(T)
    loss = 0.5 * ((Ht @ Wt.T - Tt) ** 2).sum() / H.shape[0] + 0.5 * lam * (Wt**2).sum()
    loss.backward()
    return Wt.grad.numpy()


@pytest.mark.parametrize("C, N, p, a", [(2, 4, 3, 0.0), (4, 5, 7, 0.0), (6, 3, 10, 0.15)])
def test_parts_sum_to_the_measured_errors(C, N, p, a):
    rng = np.random.default_rng(C + p)
    lam = 0.03
    labels, H = _problem(rng, C, N, p)
    W = rng.normal(size=(C, p)) * 0.2
    b = sqi_bounds(W, H, labels, lam, label_smoothing=a)

    T = _targets(labels, C, a)
    F = H @ W.T
    eps = 1 - np.mean(F[np.arange(len(labels)), labels])
    e = eps - a * (C - 1) / C
    mu = np.stack([H[labels == c].mean(0) for c in range(C)])
    Mt = mu - H.mean(0)
    scale = np.sum(W * Mt) / np.sum(Mt**2)
    scale_pred = e / (lam * (C - 1))  # poster's NC3 scale, §4.3
    row = np.mean(np.sum(W**2, axis=1))
    row_pred = e * (1 - C * eps / (C - 1)) / (C * lam)  # poster's equinorm, §4.3
    assert b.w_scale_pred == pytest.approx(scale_pred, rel=1e-12)
    assert b.w_row_norm_sq_pred == pytest.approx(row_pred, rel=1e-12)
    rel_scale, rel_row = (scale - scale_pred) / scale_pred, (row - row_pred) / row_pred
    assert b.w_scale_part_stationarity + b.w_scale_part_sqi == pytest.approx(rel_scale, rel=IDENTITY_RTOL)
    assert b.w_row_norm_sq_part_stationarity + b.w_row_norm_sq_part_sqi == pytest.approx(
        rel_row, rel=IDENTITY_RTOL
    )
    G = _autograd_gradient(W, H, T, lam)
    assert b.stationarity_residual == pytest.approx(np.linalg.norm(G) / (lam * np.linalg.norm(W)), rel=1e-12)
    P = np.where(np.eye(C)[labels] > 0, 1.0, -1.0 / (C - 1))
    E = T - F - e * P
    assert b.sqi_residual == pytest.approx(np.linalg.norm(E) / np.linalg.norm(T - F), rel=1e-12)


def _errors_within_bounds(b):
    for err, bound in (
        (b.w_scale_err, b.w_scale_bound),
        (b.w_row_norm_sq_err, b.w_row_norm_sq_bound),
        (b.w_cos_err, b.w_cos_bound),
        (b.nc3, b.nc3_bound),
    ):
        assert err <= bound * (1 + 1e-12), (err, bound)


@pytest.mark.parametrize("seed", range(12))
def test_bounds_hold_at_random_and_critical_points(seed):
    rng = np.random.default_rng(100 + seed)
    C, N, p = int(rng.integers(2, 7)), int(rng.integers(2, 6)), int(rng.integers(2, 12))
    lam, a = float(10 ** rng.uniform(-3, -0.5)), float(rng.choice([0.0, 0.1]))
    labels, H = _problem(rng, C, N, p, offset=float(rng.uniform(0, 3)))
    T = _targets(labels, C, a)
    for W in (rng.normal(size=(C, p)) * 0.3, _ridge(H, T, lam)):
        b = sqi_bounds(W, H, labels, lam, label_smoothing=a)
        if np.isfinite(b.w_scale_pred):
            _errors_within_bounds(b)


def _collapsed_features(C, N, p, rho, g):
    """Features at their class means: a simplex ETF of radius rho plus a global mean of norm g
    orthogonal to it (the ReLU-like common offset)."""
    E = np.eye(C) - 1.0 / C  # (C, C) centred one-hot, rows sum to zero
    means = np.zeros((C, p))
    means[:, :C] = rho * E / np.linalg.norm(E[0])
    means[:, C] = g
    return np.repeat(np.arange(C), N), np.repeat(means, N, axis=0)


def test_predictions_hold_in_the_large_mean_limit():
    """At the last layer's critical point on collapsed features, E is only the output-sum deficit,
    which shrinks as the features' common mean grows: the errors and the bounds go to zero."""
    C, N, p, lam = 4, 5, 8, 0.01
    previous = None
    for g in (1.0, 10.0, 100.0):
        labels, H = _collapsed_features(C, N, p, rho=1.0, g=g)
        W = _ridge(H, _targets(labels, C, 0.0), lam)
        b = sqi_bounds(W, H, labels, lam)
        assert b.stationarity_residual < 1e-10
        _errors_within_bounds(b)
        if previous is not None:
            assert b.sqi_residual < previous.sqi_residual / 10
        previous = b
    assert max(previous.w_scale_err, previous.w_row_norm_sq_err, previous.w_cos_err) < 1e-3
    assert max(previous.w_scale_bound, previous.w_row_norm_sq_bound, previous.w_cos_bound) < 1e-1


def test_output_sum_deficit_at_a_critical_point():
    """§12.5: at G = 0 the deficit d = 1 - F 1 solves (I + H H^T/(n lam)) d = 1, so it is never 0."""
    rng = np.random.default_rng(7)
    C, N, p, lam = 3, 4, 5, 0.05
    labels, H = _problem(rng, C, N, p)
    n = len(labels)
    W = _ridge(H, _targets(labels, C, 0.0), lam)
    d = 1 - (H @ W.T).sum(axis=1)
    expected = np.linalg.solve(np.eye(n) + H @ H.T / (n * lam), np.ones(n))
    np.testing.assert_allclose(d, expected, rtol=1e-9)
    assert sqi_bounds(W, H, labels, lam).output_sum_residual == pytest.approx(
        np.sqrt(np.mean(d**2)), rel=1e-9
    )


def test_labels_with_negative_strides_are_read_like_their_copy():
    """``labels[::-1]`` is a view torch cannot share (before: torch's "negative strides" error)."""
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 4)[::-1]
    H, W = rng.normal(size=(12, 5)), rng.normal(size=(3, 5))
    got, expected = (dataclasses.asdict(sqi_bounds(W, H, y, 0.02)) for y in (labels, labels.copy()))
    assert got.keys() == expected.keys()
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_float32_tensor_features_are_measured_in_float64():
    """Training passes a network's float32 features as a torch tensor (computed on its device): every
    field equals the NumPy float64 computation typed out here on the same values (products exact in
    float64), with the spectral norms by SVD, not the Gram eigenvalues sqi_bounds uses."""
    rng = np.random.default_rng(5)
    C, N, p, lam, a = 5, 8, 12, 0.02, 0.1
    labels = np.repeat(np.arange(C), N)
    H32 = torch.from_numpy(np.abs(rng.normal(size=(C * N, p)) + 1.0).astype(np.float32))  # ReLU-like
    T = _targets(labels, C, a)
    ridge = _ridge(H32.double().numpy(), T, lam)  # near a critical point, so the predictions apply
    W32 = torch.from_numpy((ridge + 0.01 * rng.normal(size=(C, p))).astype(np.float32))
    b = sqi_bounds(W32, H32, torch.from_numpy(labels), lam, label_smoothing=a)

    H, W = H32.double().numpy(), W32.double().numpy()
    n = C * N
    F = H @ W.T
    eps = 1 - np.mean(F[np.arange(n), labels])
    e = eps - a * (C - 1) / C
    P = np.where(np.eye(C)[labels] > 0, 1.0, -1.0 / (C - 1))
    E, G = T - F - e * P, _autograd_gradient(W, H, T, lam)
    Mt = np.stack([H[labels == c].mean(0) for c in range(C)]) - H.mean(0)
    s = e / (lam * (C - 1))
    delta = (np.linalg.norm(G) + np.linalg.norm(E) * np.linalg.norm(H, 2) / n) / lam
    dK_sqi = (E.T @ T - e * (E.T @ P + P.T @ E) - E.T @ E) / n
    k = lam * e * (1 - C * eps / (C - 1)) / (C * lam)  # lam times the equinorm prediction
    expected = {
        "eps": eps,
        "stationarity_residual": np.linalg.norm(G) / (lam * np.linalg.norm(W)),
        "sqi_residual": np.linalg.norm(E) / np.linalg.norm(T - F),
        "output_sum_residual": np.sqrt(np.mean((1 - F.sum(1)) ** 2)),
        "w_scale": np.sum(W * Mt) / np.sum(Mt**2),
        "w_scale_bound": delta / (abs(s) * np.linalg.norm(Mt)),
        "w_scale_part_sqi": np.sum(E.T @ H / (n * lam) * Mt) / (np.sum(Mt**2) * s),
        "nc3": np.sum((W / np.linalg.norm(W) - Mt / np.linalg.norm(Mt)) ** 2),
        "nc3_bound": (2 * delta / np.linalg.norm(W)) ** 2,
        "gram_part_stationarity": np.linalg.norm(G @ W.T, 2) / k,
        "gram_part_sqi": np.linalg.norm(dK_sqi, 2) / k,
    }
    for key, value in expected.items():
        assert getattr(b, key) == pytest.approx(value, rel=1e-11), key
    numpy64 = sqi_bounds(W, H, labels, lam, label_smoothing=a)  # the same values as float64 NumPy
    for key, value in numpy64.as_dict().items():
        assert getattr(b, key) == pytest.approx(value, rel=1e-12), key


def test_undefined_without_weight_decay_and_refuses_imbalance():
    rng = np.random.default_rng(1)
    labels, H = _problem(rng, 3, 4, 5)
    b = sqi_bounds(rng.normal(size=(3, 5)), H, labels, 0.0)
    assert np.isnan(b.w_scale_pred) and np.isnan(b.w_cos_bound)
    with pytest.raises(ValueError, match="balanced"):
        sqi_bounds(rng.normal(size=(3, 5)), H, np.array([0] * 5 + [1] * 4 + [2] * 3), 0.1)


def test_proofs_verify_and_fail_on_a_wrong_formula():
    assert verify("sqi_identities").status == "verified"
    assert verify("sqi_bound_steps").status == "verified"
    wrong = verify("sqi_identities", w_row_norm_sq=lambda C, eps, lam, a=0: eps / (C * lam))
    assert wrong.status == "failed" and "K_pred" in wrong.message


def test_training_records_errors_within_their_bounds_every_epoch():
    """A short run with weight decay: every recorded epoch has each prediction's error at most its
    bound, and the predictions are those of the history's *_pred columns."""
    from ufm.datasets import load_dataset
    from ufm.training import TrainConfig, train

    data = load_dataset("default", per_class=10, test_per_class=5)
    config = TrainConfig(
        per_class=10, test_per_class=5, width=16, depth=3, batch_size=20, epochs=6, device="cpu"
    )
    h = train(config, progress=False, dataset=data).history
    assert len(h["epoch"]) == 7 and np.all(np.isfinite(h["stationarity_residual"]))
    for name in ("w_scale", "w_row_norm_sq", "w_cos"):
        assert np.all(h[f"{name}_err"] <= h[f"{name}_bound"] * (1 + 1e-12)), name
        measured, pred = h[name if name != "w_cos" else "w_cos_mean"], h[f"{name}_pred"]
        # The *_pred columns take eps from the network's float32 outputs, sqi_bounds from F = H W^T in
        # float64 (its identities need the exact product): they agree to float32 rounding.
        np.testing.assert_allclose(h[f"{name}_err"], np.abs(measured - pred) / np.abs(pred), rtol=1e-5)
    assert np.all(h["nc3"] <= h["nc3_bound"] * (1 + 1e-12))
    parts = h["w_scale_part_stationarity"] + h["w_scale_part_sqi"]
    np.testing.assert_allclose(np.abs(parts), h["w_scale_err"], rtol=1e-8)


def test_refinement_makes_the_last_layer_stationary(tmp_path, capsys):
    """--refine-to: the refined row has stationarity_residual < tol and no stationarity part left in
    the errors, and a lower objective than SGD's end (the ridge solution minimizes it in W_L)."""
    from ufm.cli import main

    args = ["train", "--per-class", "10", "--width", "16", "--epochs", "3", "--batch-size", "20"]
    args += ["--device", "cpu", "--refine-to", "1e-4", "--out", str(tmp_path / "run"), "--json"]
    assert main(args) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["refined"] == 1 and final["stationarity_residual"] < 1e-4
    assert abs(final["w_scale_part_stationarity"]) < 1e-3 * abs(final["w_scale_part_sqi"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [int(float(r["refined"])) for r in rows[-2:]] == [0, 1]
    assert float(rows[-1]["objective"]) < float(rows[-2]["objective"])
    assert main(args[:-3] + ["--wd", "0", "--json"]) == 2
    assert "refine_to" in capsys.readouterr().err
