"""Training: the poster's loss and weight decay, measurements equal to the NC library's, exact resume,
divergence handling, the CLI and the weight-decay experiment, all on tiny subsets of the digits."""

import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

from ufm import training
from ufm.cli import main
from ufm.datasets import load_dataset
from ufm.experiments.weight_decay import format_theory_table, weight_decay_experiment
from ufm.metrics import nc_metrics
from ufm.networks import build_network
from ufm.tables import json_parts_items
from ufm.training import (
    DIVERGENCE_FACTOR,
    TrainConfig,
    _SGDStep,
    _singular_values,
    _TrainState,
    _Welford,
    measure_network,
    train,
)

# Seconds-scale settings: 10 digits of each class, a small MLP.
TINY = dict(per_class=10, test_per_class=5, width=16, depth=3, batch_size=20, lr=0.02, epochs=4, device="cpu")
TINY_WD = TrainConfig.wd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_dataset("default", per_class=10, test_per_class=5)


def test_a_few_epochs_learn_and_record_everything(data):
    result = train(TrainConfig(**TINY), progress=False, dataset=data)
    h = result.history
    assert result.success and result.status == 0 and result.nsteps == 4 * 5
    np.testing.assert_array_equal(h["epoch"], np.arange(5))
    assert h["train_loss"][-1] < h["train_loss"][0]
    # The objective is the data term plus lambda/2 sum_k ||W_k||^2 from the recorded norms.
    reg = 0.5 * TINY_WD * sum(h[f"norm_W{k}"] ** 2 for k in (1, 2, 3))
    np.testing.assert_allclose(h["objective"], h["train_loss"] + reg, rtol=1e-12)
    np.testing.assert_allclose(h["rho"], h["norm_W1"] * h["norm_W2"] * h["norm_W3"], rtol=1e-12)
    for key in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4", "eps", "w_row_norm_sq_pred"):
        assert key in result.final
    assert result.final["noise_steps"] == 5 and result.final["noise_out"] > 0
    assert len(result.singular_values) == 3 and result.singular_values[2].shape == (10,)


@pytest.mark.parametrize("a", [0.0, 0.1])
def test_square_loss_and_weight_decay_step_match_the_poster(tmp_path, data, a):
    """One full-batch step without momentum equals SGD(weight_decay=lambda) on
    1/(2NC) sum_{n,c,i} (t - f)^2 with targets t = (1 - a) y + a/C, written out independently here."""
    cfg = TrainConfig(
        **(TINY | dict(batch_size=100, epochs=1, momentum=0.0, checkpoint_every=1, label_smoothing=a))
    )
    train(cfg, out=tmp_path, progress=False, dataset=data)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]

    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    N, C = 10, 10
    T = (1 - a) * torch.eye(C)[y] + a / C  # (NC, C) smoothed one-hot
    loss = ((T - net(x)) ** 2).sum() / (2 * N * C)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("a", [0.0, 0.1, 0.5])
def test_mini_batch_objective_with_label_smoothing_is_typed_out(a):
    """The data term training minimizes, on a fixed (n, C) tensor: 0.5 mean_i ||f_i - t_i||^2 with
    t_i = (1 - a) e_{y_i} + a/C, summed here element by element (float64, rounding only)."""
    C = 3
    f = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75], [1.5, 1.0, 0.125], [-2.0, 0.5, 0.0]])
    y = torch.tensor([0, 2, 1, 2])
    expected = 0.0
    for i in range(4):
        for c in range(C):
            t = (1 - a) * (c == int(y[i])) + a / C
            expected += 0.5 * (float(f[i, c]) - t) ** 2 / 4
    got = TrainConfig(label_smoothing=a).data_loss.torch_value(f, y, C)
    assert float(got) == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_measurements_from_hooks_equal_the_library(data):
    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=3)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    wd = 1e-2
    row = measure_network(net, x, y, xt, yt, wd)

    with torch.no_grad():
        H = net.features(x).double().numpy()  # (n, p), no hook
        W = net.classifier_weight().double().numpy()  # (C, p)
        f = net(x).double().numpy()
    ref = nc_metrics(H, data.y_train, W=W, outputs=f)
    # The training measures the float32 features as they are (float32 products, docs/theory.md §17.9;
    # NC1 measured 1.4e-8 off the float64 answer here); the class-mean measures are float64 sums.
    for key in ("nc2_equinorm", "nc2_equiangle", "nc2_equiangle_w", "nc3", "nc4", "eps", "sqi_spread"):
        assert row[key] == pytest.approx(getattr(ref, key), rel=1e-12, abs=1e-15), key
    assert row["nc1"] == pytest.approx(ref.nc1, rel=1e-6)
    # Theorem at the measured eps (the poster's formulas typed out), and the least-squares NC3 scale.
    C, eps = 10, ref.eps
    assert row["w_row_norm_sq_pred"] == pytest.approx((eps - C * eps**2 / (C - 1)) / (C * wd), rel=1e-12)
    assert row["w_scale_pred"] == pytest.approx(eps / (wd * (C - 1)), rel=1e-12)
    cos = (W @ W.T) / np.outer(np.linalg.norm(W, axis=1), np.linalg.norm(W, axis=1))
    assert row["w_cos_mean"] == pytest.approx(cos[~np.eye(C, dtype=bool)].mean(), rel=1e-10)
    assert row["w_cos_pred"] == pytest.approx(-1 / 9, rel=1e-15)
    assert row["w_row_norm_sq"] == pytest.approx(np.mean(np.sum(W**2, axis=1)), rel=1e-12)
    mu = np.stack([H[data.y_train == c].mean(0) for c in range(C)])
    Mt = mu - H.mean(0)
    scale = np.linalg.lstsq(Mt.reshape(-1, 1), W.reshape(-1), rcond=None)[0][0]
    assert row["w_scale"] == pytest.approx(scale, rel=1e-10)
    for k, Wk in enumerate(net.weights(), start=1):
        s = np.linalg.svd(Wk.detach().double().numpy(), compute_uv=False)
        assert row[f"rank_W{k}"] == np.sum(s > 1e-2 * s[0])
        assert row[f"srank_W{k}"] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-10)
    assert row["train_acc"] == np.mean(f.argmax(1) == data.y_train)
    # Without weight decay the theorem's predictions are undefined, not infinite.
    assert np.isnan(measure_network(net, x, y, xt, yt, 0.0)["w_scale_pred"])


def test_sqi_columns_equal_a_float64_computation_on_the_host(data):
    """measure_network takes the SQI columns from the float32 features on their device (float64
    there): they equal sqi_bounds on a float64 NumPy copy of the same features, and the norms and rho
    equal NumPy's of float64 copies of the weights."""
    from ufm.sqi_deviation import sqi_bounds

    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=4)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    with torch.no_grad():  # W_L near the ridge solution, where every prediction is defined
        H = net.features(x).double().numpy()
        n, lam = len(H), 0.01
        ridge = np.linalg.solve(H.T @ H + n * lam * np.eye(16), H.T @ np.eye(10)[data.y_train]).T
        net.layers[-1].W.copy_(torch.from_numpy(ridge * 1.1))
    row = measure_network(net, x, y, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test), lam)
    Ws = [W.detach().double().numpy() for W in net.weights()]
    ref = sqi_bounds(Ws[-1], H, data.y_train, lam).as_dict()
    # The row's eps, nc3, w_scale, ... and *_pred come from nc_metrics' float32 outputs instead.
    taken = ("eps", "nc3", "w_scale", "w_row_norm_sq", "w_cos")
    compared = [k for k in ref if k in row and k not in taken and not k.endswith("_pred")]
    assert len(compared) == 16 and not np.isnan([ref[k] for k in compared]).any()
    for key in compared:
        assert row[key] == pytest.approx(ref[key], rel=1e-12), key
    norms = [np.linalg.norm(W) for W in Ws]
    for k, norm in enumerate(norms, start=1):
        assert row[f"norm_W{k}"] == pytest.approx(norm, rel=1e-14)
    assert row["rho"] == pytest.approx(np.prod(norms), rel=1e-14)


@pytest.mark.parametrize(("loss", "a"), [("mse", 0.1), ("ce", 0.0), ("ce", 0.2)])
def test_measured_losses_follow_the_configured_loss(data, loss, a):
    """train_loss/test_loss are 1/n sum_i l(f_i, t_i) of the run's loss: the square loss
    0.5 ||f - t||^2, or the cross-entropy -<t, log softmax f>, with t = (1 - a) e_y + a/C."""
    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=5)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    wd = 1e-2
    row = measure_network(net, x, y, xt, yt, wd, loss=TrainConfig(loss=loss, label_smoothing=a).data_loss)
    with torch.no_grad():
        f, ft = net(x).double().numpy(), net(xt).double().numpy()

    def typed(f, labels):
        t = np.full(f.shape, a / 10)
        t[np.arange(len(labels)), labels] += 1 - a
        if loss == "mse":
            return 0.5 * np.sum((f - t) ** 2) / len(labels)
        log_p = f - f.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        return -np.sum(t * log_p) / len(labels)

    assert row["train_loss"] == pytest.approx(typed(f, data.y_train), rel=1e-12)
    assert row["test_loss"] == pytest.approx(typed(ft, data.y_test), rel=1e-12)
    reg = 0.5 * wd * sum(float((W.detach().double() ** 2).sum()) for W in net.weights())
    assert row["objective"] == pytest.approx(row["train_loss"] + reg, rel=1e-12)


def test_measurements_on_unbalanced_classes_equal_the_library(data):
    """Counts (10, 7, 3, 10, ...): class means over each class's own examples and mu_G over all n,
    as nc_metrics computes them from features taken without the hook."""
    counts = (10, 7, 3) + (10,) * 7
    keep = np.concatenate([np.flatnonzero(data.y_train == c)[:k] for c, k in enumerate(counts)])
    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=3)
    x, y = torch.from_numpy(data.x_train[keep]), torch.from_numpy(data.y_train[keep])
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    assert tuple(np.bincount(y.numpy())) == counts
    row = measure_network(net, x, y, xt, yt, 1e-2)
    with torch.no_grad():
        H = net.features(x).double().numpy()
        W = net.classifier_weight().double().numpy()
        f = net(x).double().numpy()
    ref = nc_metrics(H, y.numpy(), W=W, outputs=f)
    for key in ("nc2_equinorm", "nc2_equiangle", "nc3", "nc4", "eps"):
        assert row[key] == pytest.approx(getattr(ref, key), rel=1e-12, abs=1e-15), key
    assert row["nc1"] == pytest.approx(ref.nc1, rel=1e-6)  # float32 features (docs/theory.md §17.9)
    mu = np.stack([H[y.numpy() == c].mean(0) for c in range(10)])
    Mt = mu - H.mean(0)  # mu_G over all examples
    assert row["w_scale"] == pytest.approx(np.sum(W * Mt) / np.sum(Mt**2), rel=1e-10)


def test_training_on_a_hand_built_unbalanced_dataset(data):
    """Nothing in train needs N per class: the probe takes what each class has; per_class must then be None."""
    keep = np.concatenate([np.flatnonzero(data.y_train == c)[: 4 if c == 0 else 10] for c in range(10)])
    unbalanced = dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    assert unbalanced.counts == (4,) + (10,) * 9 and not unbalanced.balanced
    cfg = TrainConfig(**(TINY | dict(per_class=None, epochs=2)))
    result = train(cfg, progress=False, dataset=unbalanced)
    # 94 examples in batches of 20: 4 steps an epoch, the last epoch's 4 tracked for the SGD noise.
    assert result.success and result.nsteps == 2 * 4 and result.final["noise_steps"] == 4
    with pytest.raises(ValueError, match=r"counts \(4, 10,.*config\.per_class = 10"):
        train(TrainConfig(**TINY), progress=False, dataset=unbalanced)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_resume_equals_uninterrupted(tmp_path, data, weight_norm):
    cfg = TrainConfig(**(TINY | dict(checkpoint_every=1, weight_norm=weight_norm)))
    full = train(cfg, out=tmp_path / "full", progress=False, dataset=data)
    part = train(cfg, out=tmp_path / "part", progress=False, dataset=data, stop_after_epoch=2)
    assert not part.success and "resume" in part.message
    resumed = train(cfg, out=tmp_path / "part", resume=True, progress=False, dataset=data)
    assert resumed.success and resumed.nsteps == full.nsteps
    for key, column in full.history.items():
        np.testing.assert_array_equal(resumed.history[key], column, err_msg=key)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final == full.final
    csv_rows = (tmp_path / "part" / "history.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 5 and csv_rows[0].startswith("epoch,step,lr,")
    assert json.loads((tmp_path / "part" / "config.json").read_text())["wd"] == cfg.wd


def test_resume_refuses_another_configuration(tmp_path, data):
    train(TrainConfig(**(TINY | dict(epochs=1))), out=tmp_path, progress=False, dataset=data)
    with pytest.raises(ValueError, match="differs in lr"):
        train(TrainConfig(**(TINY | dict(epochs=1, lr=0.5))), out=tmp_path, resume=True, dataset=data)


def test_a_checkpoint_from_before_the_loss_fields_resumes(tmp_path, data):
    """A stored identity without ``loss``/``label_smoothing`` (written before they existed) was a run
    with the defaults: it resumes to the uninterrupted run, and refuses a smoothed one by name."""
    cfg = TrainConfig(**(TINY | dict(checkpoint_every=1)))
    full = train(cfg, progress=False, dataset=data)
    train(cfg, out=tmp_path, progress=False, dataset=data, stop_after_epoch=2)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["identity"]["loss"], state["identity"]["label_smoothing"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="differs in label_smoothing$"):
        smoothed = TrainConfig(**(TINY | dict(checkpoint_every=1, label_smoothing=0.1)))
        train(smoothed, out=tmp_path, resume=True, dataset=data)
    resumed = train(cfg, out=tmp_path, resume=True, progress=False, dataset=data)
    assert resumed.success
    for key, column in full.history.items():
        np.testing.assert_array_equal(resumed.history[key], column, err_msg=key)


def test_a_checkpoint_with_a_pickled_history_resumes(tmp_path, data):
    """Checkpoints before 0.2 held the history and spectra as lists of dicts, not JSON parts: such a
    checkpoint resumes to the uninterrupted run; history text that does not parse is named damaged."""
    cfg = TrainConfig(**(TINY | dict(checkpoint_every=1)))
    full = train(cfg, progress=False, dataset=data)
    train(cfg, out=tmp_path, progress=False, dataset=data, stop_after_epoch=2)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert all(isinstance(part, str) for part in state["history"] + state["spectra"])
    old = dict(state, history=json_parts_items(state["history"]), spectra=json_parts_items(state["spectra"]))
    torch.save(old, path)
    resumed = train(cfg, out=tmp_path, resume=True, progress=False, dataset=data)
    assert resumed.success
    for key, column in full.history.items():
        np.testing.assert_array_equal(resumed.history[key], column, err_msg=key)
    torch.save(dict(state, history=["[{"]), path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: its history is unreadable .*damaged"):
        train(cfg, out=tmp_path, resume=True, progress=False, dataset=data)


@pytest.mark.parametrize(
    ("change", "message"),
    [(dict(loss="hinge"), r"unknown loss 'hinge'.*'mse'.*'ce'"), (dict(label_smoothing=1.0), r"\[0, 1\)"),
     (dict(label_smoothing=-0.1), r"\[0, 1\)")],
)  # fmt: skip
def test_config_refuses_an_unknown_loss_or_smoothing(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


@pytest.mark.parametrize("shape", [(12, 70), (70, 12), (20, 20), (1, 9), (9, 1), (8, 3, 3, 3)])
def test_exact_singular_values_equal_numpys_svd(shape):
    """The exact singular values (through the QR factor of the longer side) against NumPy's SVD of the
    weight as a float64 matrix (out, fan_in), to 1e-13 of the largest; the Gram-matrix ones to 1e-7 of
    it, with spectra graded down to 1e-6 of the largest (values below ~1e-8 are lost by design)."""
    rng = np.random.default_rng(4)
    out, fan_in = shape[0], math.prod(shape[1:])
    k = min(out, fan_in)
    U, _ = np.linalg.qr(rng.standard_normal((out, k)))
    V, _ = np.linalg.qr(rng.standard_normal((fan_in, k)))
    s = np.logspace(0, -6, k)
    W = torch.from_numpy((U * s) @ V.T).reshape(shape)
    want = np.linalg.svd(W.reshape(out, -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(want, s, rtol=1e-9)
    np.testing.assert_allclose(_singular_values(W), want, rtol=0, atol=1e-13 * want[0])
    np.testing.assert_allclose(_singular_values(W, exact=False), want, rtol=0, atol=1e-7 * want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_welford_noise_equals_the_two_pass_variance(dtype):
    """The SGD-noise tracker's running moments (float64 whatever the input) against NumPy's two-pass
    variance of the same stream, to 1e-12 relative: sqrt(sum of variances) / ||mean||."""
    rng = np.random.default_rng(3)
    stream = 5.0 + rng.standard_normal((40, 7, 3))  # 40 steps of a (7, 3) weight
    tracker = _Welford()
    for x in stream:
        tracker.add(torch.from_numpy(x).to(dtype))
    values = stream.astype(np.float32).astype(float) if dtype == torch.float32 else stream
    expected = np.sqrt(values.var(axis=0).sum()) / np.linalg.norm(values.mean(axis=0))
    assert tracker.count == 40
    assert tracker.relative_std() == pytest.approx(expected, rel=1e-12)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    cfg = TrainConfig(**(TINY | dict(checkpoint_every=1)))
    train(cfg, out=tmp_path, progress=False, dataset=data, stop_after_epoch=2)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    # Blow up the first layer of the saved model: the resumed run must diverge in epoch 3.
    state["model"]["layers.0.W"] *= 1e3
    torch.save(state, path)
    saved = path.read_bytes()
    result = train(cfg, out=tmp_path, resume=True, progress=False, dataset=data)
    assert result.status == 1 and not result.success
    # 100 examples in batches of 20: epoch 3 starts at step 11, the first on the blown-up weights.
    assert "diverged in epoch 3 (step 11)" in result.message and "epoch 2) is kept" in result.message
    assert path.read_bytes() == saved
    assert result.final["epoch"] == 2


def test_divergence_inside_an_epoch_names_the_first_diverged_step(data):
    """The losses are read back once an epoch; the message still names the first mini-batch whose loss
    diverged and its loss, as a loop checking every step on the host finds them."""
    cfg = TrainConfig(**(TINY | dict(lr=3.0, epochs=3)))
    result = train(cfg, progress=False, dataset=data)
    assert result.status == 1
    state = _TrainState.start(cfg, data, torch.device("cpu"))
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    limit = DIVERGENCE_FACTOR * max(result.history["train_loss"][0], 1.0)
    step, value, sgd_step = 0, 0.0, _SGDStep(state.model, state.optimizer, cfg.wd)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=state.shuffle)
        for i in range(0, len(y) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            data_term = cfg.data_loss.torch_value(state.model(x[idx]), y[idx], data.C)
            step, value = step + 1, float(data_term.detach())
            if not math.isfinite(value) or value > limit:
                break
            sgd_step(data_term)
        else:
            state.scheduler.step()
            continue
        break
    assert 1 < step <= cfg.epochs * 5 and step % 5 != 1  # inside an epoch, not at its first step
    assert f"(step {step}): mini-batch loss {value:.4g}" in result.message


def test_cli_json_last_line(tmp_path, capsys):
    code = main(
        ["train", "--per-class", "10", "--epochs", "2", "--width", "16", "--depth", "2", "--batch-size", "20"]
        + ["--device", "cpu", "--out", str(tmp_path), "--json"]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "epoch",
        "train_acc",
        "test_acc",
        "nc1",
        "nc2_equinorm",
        "nc2_equiangle",
        "nc3",
        "nc4",
        "eps",
    ):
        assert isinstance(last[key], float | int), key
    eps, wd = last["eps"], TrainConfig.wd
    assert last["epoch"] == 2 and last["w_row_norm_sq_pred"] == pytest.approx(
        (eps - 10 * eps**2 / 9) / (10 * wd), rel=1e-12
    )
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "final.json").is_file()


def test_cli_label_smoothing_is_trained_and_recorded(tmp_path, capsys):
    """``ufm train --label-smoothing 0.1`` runs and config.json records a = 0.1 (and the square loss)."""
    code = main(
        ["train", "--per-class", "10", "--epochs", "1", "--width", "16", "--depth", "2", "--batch-size", "20"]
        + ["--device", "cpu", "--out", str(tmp_path), "--label-smoothing", "0.1", "--json"]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["epoch"] == 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["label_smoothing"] == 0.1 and config["loss"] == "mse"


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--dataset", "imagenet", "--epochs", "1"]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    assert main(["train", "--dataset", f"mnist:{tmp_path}", "--epochs", "1"]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    assert main(["train", "--resume", "--epochs", "1"]) == 2


def test_weight_decay_experiment_quick_smoke(tmp_path):
    exp = weight_decay_experiment(quick=True, out=tmp_path, **(TINY | dict(epochs=2)))
    assert [r.config.wd for r in exp.results] == [0.0, TrainConfig.wd, 2 * TrainConfig.wd]
    assert exp.figure.is_file() and exp.figure.stat().st_size > 10_000
    assert exp.table[0]["w_row_norm_sq_pred"] is None and exp.table[1]["w_row_norm_sq_pred"] is not None
    text = format_theory_table(exp.table, width=None)  # --wide: a header and one line per run
    assert len(text.splitlines()) == 4 and "NC3" in text
    wrapped = format_theory_table(exp.table)  # blocks of 4 lines that fit 100 columns, lambda leading each
    blocks = wrapped.split("\n\n")
    assert len(blocks) > 1 and all(len(line) <= 100 for line in wrapped.splitlines())
    assert all(b.splitlines()[0].split()[0] == "lambda" and len(b.splitlines()) == 4 for b in blocks)
    assert sorted(" ".join(b.splitlines()[0] for b in blocks).split()) == sorted(
        (" lambda" * (len(blocks) - 1) + " " + text.splitlines()[0]).split()
    )
    assert (tmp_path / "theory_vs_measurement.csv").is_file()
    # The runs with weight decay end refined: two error rows each, the refined one with no
    # stationarity part left (docs/theory.md §12.6), and the theory table keeps SGD's end.
    assert [(row["wd"], row["point"]) for row in exp.errors] == [
        (wd, point) for wd in (TrainConfig.wd, 2 * TrainConfig.wd) for point in ("SGD end", "W_L refined")
    ]
    for sgd, refined in zip(exp.errors[::2], exp.errors[1::2]):
        assert refined["stationarity_residual"] < 1e-4 < sgd["stationarity_residual"]
        assert abs(refined["w_scale_part_stationarity"]) < 1e-3 * abs(refined["w_scale_part_sqi"])
    assert exp.table[1]["w_scale"] == exp.results[1].history["w_scale"][-2]
    assert (tmp_path / "prediction_errors.csv").is_file()


def test_history_records_the_rate_each_epoch_trained_at(data):
    """Step schedule over 4 epochs: milestones after epochs 2 and 3, so epochs 1-4 train at
    lr, lr, lr/10, lr/100 (row 0 is the start, at lr)."""
    result = train(TrainConfig(**TINY), dataset=data)
    lrs = result.history["lr"]
    np.testing.assert_allclose(lrs, [0.02, 0.02, 0.02, 0.002, 0.0002], rtol=1e-12)


@pytest.mark.skipif(sys.platform == "win32", reason="runs are locked with fcntl.flock")
def test_a_second_run_into_a_directory_being_written_is_refused(data, tmp_path):
    """Before: two `ufm train --out DIR` started together both ran, writing their files into DIR in
    turns. The directory is locked while a run writes there; the other run is refused and writes
    nothing, and once the lock is released the directory takes a run."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # the other run's lock, taken here without ufm's helper
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=rf"^another run is writing to {re.escape(str(out))} now"):
            train(TrainConfig(**TINY), out=out, progress=False, dataset=data)
        assert list(out.iterdir()) == []
    finally:
        os.close(held)
    assert train(TrainConfig(**TINY), out=out, progress=False, dataset=data).success
    assert sorted(f.name for f in out.iterdir()) == sorted(training.RUN_FILES)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_is_refused(lr):
    """One message for every bad rate (before: 0 said "> 0", a negative one ">= 0")."""
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got"):
        TrainConfig(**(TINY | dict(lr=lr)))


@pytest.mark.parametrize(
    ("change", "named"),
    [(dict(dataset="mnist:/elsewhere"), "config.dataset"), (dict(per_class=8), "config.per_class"),
     (dict(test_per_class=3), "config.test_per_class")],
)  # fmt: skip
def test_a_dataset_that_is_not_the_configs_is_refused(data, change, named):
    """config.json and resume trust the config: a dataset passed in must be the one it names."""
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        train(TrainConfig(**(TINY | change)), progress=False, dataset=data)


def test_measure_every_and_svd_every(data):
    """--measure-every K: rows only at epochs 0, K, 2K, ... and the last; --svd-every K: the singular-value
    columns blank (NaN) at the measured epochs not divisible by K, and every other number, and the
    weights, the same as a run measuring everything (measurement never perturbs training)."""
    full = train(TrainConfig(**TINY), progress=False, dataset=data)
    sparse = train(TrainConfig(**(TINY | dict(measure_every=3, svd_every=2))), progress=False, dataset=data)
    assert sparse.history["epoch"].tolist() == [0, 3, 4]
    rows = [0, 3, 4]
    sv_keys = [k for k in full.history if k.startswith(("rank_W", "srank_W")) or k == "wl_sv_ratio"]
    assert len(sv_keys) == 7
    for key, column in sparse.history.items():
        if key in sv_keys:
            assert np.isnan(column[1]) and not np.isnan(column[[0, 2]]).any(), key
            column = column[[0, 2]]
            expected = full.history[key][[0, 4]]
        else:
            expected = full.history[key][rows]
        np.testing.assert_array_equal(column, expected, err_msg=key)
    for a, b in zip(full.singular_values, sparse.singular_values):
        np.testing.assert_array_equal(a, b)


def test_svd_layers_takes_only_the_layers_asked_for(tmp_path, data):
    """svd_layers="1,3": the singular-value columns of W_2 blank (NaN) at every epoch and no W_2 rows
    in singular_values.csv; W_1's and W_3's columns and rows, every other number and the weights are
    those of the run measuring every layer."""
    full = train(TrainConfig(**TINY), out=tmp_path / "full", progress=False, dataset=data)
    some = train(
        TrainConfig(**(TINY | dict(svd_layers="3,1"))), out=tmp_path / "some", progress=False, dataset=data
    )
    for key, column in some.history.items():
        if key in ("rank_W2", "srank_W2"):
            assert np.isnan(column).all(), key
        else:
            np.testing.assert_array_equal(column, full.history[key], err_msg=key)
    for a, b in zip(full.singular_values, some.singular_values):
        np.testing.assert_array_equal(a, b)
    full_rows = (tmp_path / "full" / "singular_values.csv").read_text().splitlines()
    some_rows = (tmp_path / "some" / "singular_values.csv").read_text().splitlines()
    assert some_rows == [r for r in full_rows if r.split(",")[2] != "2"] and len(some_rows) < len(full_rows)


@pytest.mark.parametrize("spec", ["0", "4", "1,x", "", "first"])
def test_svd_layers_refuses_a_spec_it_cannot_read(spec, capsys):
    with pytest.raises(
        ValueError, match=rf"svd_layers must be 'all', 'last' or layer numbers 1\.\.depth=3.*{spec!r}"
    ):
        TrainConfig(**(TINY | dict(svd_layers=spec)))
    assert main(["train", "--svd-layers", spec, "--depth", "3", "--show-defaults"]) == 2
    assert "svd_layers must be" in capsys.readouterr().err


def test_cli_measure_and_svd_flags(capsys):
    assert main(["train", "--measure-every", "5", "--svd-every", "10", "--show-defaults"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["measure_every"], shown["svd_every"]) == (5, 10)
    assert main(["train", "--svd-every", "0", "--show-defaults"]) == 2
    assert "svd_every" in capsys.readouterr().err


@pytest.mark.parametrize("weight_norm", [False, True])
def test_measuring_beside_the_training_writes_what_measuring_in_line_writes(
    tmp_path, data, monkeypatch, weight_norm
):
    """Measurements on a second thread (while the next epoch trains) give the same history, bit for
    bit, the same history.csv, singular_values.csv and checkpoints as measurements in line."""
    cfg = TrainConfig(**(TINY | dict(epochs=5, checkpoint_every=2, weight_norm=weight_norm)))
    runs, checkpoints = {}, {False: [], True: []}  # every checkpoint as it was written
    atomic_write = training.atomic_write

    def keeping(path, write):
        atomic_write(path, write)
        if path.name == "checkpoint.pt":
            checkpoints[path.parent.name == "True"].append(torch.load(path, weights_only=True))

    monkeypatch.setattr(training, "atomic_write", keeping)
    for overlap in (False, True):
        monkeypatch.setattr(training, "_overlap_possible", lambda overlap=overlap: overlap)
        runs[overlap] = train(cfg, out=tmp_path / str(overlap), progress=False, dataset=data)
    for key, column in runs[False].history.items():
        np.testing.assert_array_equal(runs[True].history[key], column, err_msg=key)
    assert runs[True].history["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    for name in ("history.csv", "singular_values.csv", "final.json"):
        a, b = ((tmp_path / str(o) / name).read_text() for o in (False, True))
        assert a == b or name == "final.json" and json.loads(a) == json.loads(b), name
    assert [c["epoch"] for c in checkpoints[True]] == [c["epoch"] for c in checkpoints[False]] == [2, 4, 5]
    for a, b in zip(*checkpoints.values()):
        assert a["history"] == b["history"] and a["nsteps"] == b["nsteps"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert torch.equal(a["shuffle"], b["shuffle"])
        momenta = (
            torch.cat([s["momentum_buffer"].flatten() for s in c["optimizer"]["state"].values()])
            for c in (a, b)
        )
        assert torch.equal(*momenta)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_measurement_stops_the_run_before_anything_after_it_is_written(
    tmp_path, data, monkeypatch, overlap
):
    """A measurement that fails at epoch 3 (as when the classifier's ReLUs die) ends the run with its
    epoch named; history.csv holds epochs 0-2 and the checkpoint is epoch 2's, measured in line or
    beside the training (where the error surfaces after epoch 4 has trained, before it is kept)."""
    measure = training._measure

    def failing(model, data, config, epoch, svd):
        if epoch == 3:
            raise ValueError(f"cannot measure the network after epoch {epoch}: the class means are equal")
        return measure(model, data, config, epoch, svd)

    monkeypatch.setattr(training, "_overlap_possible", lambda: overlap)
    monkeypatch.setattr(training, "_measure", failing)
    cfg = TrainConfig(**(TINY | dict(epochs=6, checkpoint_every=2)))
    with pytest.raises(ValueError, match="after epoch 3"):
        train(cfg, out=tmp_path, progress=False, dataset=data)
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("overlap", [False, True])
def test_an_interrupted_run_keeps_every_measurement_taken(tmp_path, data, monkeypatch, overlap):
    """Ctrl-C in epoch 4: the measurement of epoch 3, pending on the second thread, is still written."""
    run_epoch = training._run_epoch

    def interrupted(state, *args, **kwargs):
        if state.epoch == 3:
            raise KeyboardInterrupt
        return run_epoch(state, *args, **kwargs)

    monkeypatch.setattr(training, "_overlap_possible", lambda: overlap)
    monkeypatch.setattr(training, "_run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(
            TrainConfig(**(TINY | dict(epochs=6, checkpoint_every=3))),
            out=tmp_path,
            progress=False,
            dataset=data,
        )
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # epoch 3's, written after its row
    assert saved["epoch"] == 3 and len(training._saved_list(saved["history"])[0]) == 4


@pytest.mark.parametrize("overlap", [False, True])
def test_a_diverged_run_names_the_checkpoint_it_keeps(tmp_path, data, monkeypatch, overlap):
    """Epoch 5 diverges: the checkpoint of epoch 4 (written after its measurement, which may still be
    pending on the second thread when epoch 5 ends) is on disk and named in the message."""
    run_epoch = training._run_epoch

    def diverging(state, *args, **kwargs):
        if state.epoch == 4:
            return training._Divergence(state.nsteps + 1, math.inf)
        return run_epoch(state, *args, **kwargs)

    monkeypatch.setattr(training, "_overlap_possible", lambda: overlap)
    monkeypatch.setattr(training, "_run_epoch", diverging)
    cfg = TrainConfig(**(TINY | dict(epochs=6, checkpoint_every=2)))
    result = train(cfg, out=tmp_path, progress=False, dataset=data)
    assert result.status == 1 and "diverged in epoch 5" in result.message
    assert "epoch 4) is kept" in result.message
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and len(training._saved_list(saved["history"])[0]) == 5


def test_measurements_beside_the_training_run_on_one_torch_thread(data, monkeypatch):
    """The second thread measures on one torch thread, as a run on one thread measures in line,
    whatever count the caller's thread has; the caller's own count is left as it was."""
    measure, seen = training._measure, []

    def spy(*args):
        seen.append(torch.get_num_threads())
        return measure(*args)

    monkeypatch.setattr(training, "_overlap_possible", lambda: True)
    monkeypatch.setattr(training, "_measure", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(TrainConfig(**(TINY | dict(epochs=3))), progress=False, dataset=data)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1, 1, 1]
