"""Training: the poster's loss and weight decay, measurements equal to the NC library's, exact resume,
divergence handling, the CLI and the weight-decay experiment, all on tiny subsets of the digits."""

import json

import numpy as np
import pytest
import torch

from ufm.cli import main
from ufm.datasets import load_dataset
from ufm.metrics import nc_metrics
from ufm.networks import build_network
from ufm.training import TrainConfig, format_theory_table, measure_network, train, weight_decay_experiment

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


def test_square_loss_and_weight_decay_step_match_the_poster(tmp_path, data):
    """One full-batch step without momentum equals SGD(weight_decay=lambda) on
    1/(2NC) sum_{n,c,i} (y - f)^2, written out independently here."""
    cfg = TrainConfig(**(TINY | dict(batch_size=100, epochs=1, momentum=0.0, checkpoint_every=1)))
    train(cfg, out=tmp_path, progress=False, dataset=data)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]

    net = build_network("mlp", data.input_shape, 10, depth=3, width=16, seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    Y = torch.eye(10)[y]  # (NC, C) one-hot
    N, C = 10, 10
    loss = ((Y - net(x)) ** 2).sum() / (2 * N * C)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-7)


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
    for key in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_equiangle_w", "nc3", "nc4", "eps", "sqi_spread"):
        assert row[key] == pytest.approx(getattr(ref, key), rel=1e-12, abs=1e-15), key
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
    assert "diverged in epoch 3" in result.message and "epoch 2) is kept" in result.message
    assert path.read_bytes() == saved
    assert result.final["epoch"] == 2


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
    text = format_theory_table(exp.table)
    assert len(text.splitlines()) == 4 and "NC3" in text
    assert (tmp_path / "theory_vs_measurement.csv").is_file()


def test_history_records_the_rate_each_epoch_trained_at(data):
    """Step schedule over 4 epochs: milestones after epochs 2 and 3, so epochs 1-4 train at
    lr, lr, lr/10, lr/100 (row 0 is the start, at lr)."""
    result = train(TrainConfig(**TINY), dataset=data)
    lrs = result.history["lr"]
    np.testing.assert_allclose(lrs, [0.02, 0.02, 0.02, 0.002, 0.0002], rtol=1e-12)


@pytest.mark.parametrize(
    ("change", "named"),
    [(dict(dataset="mnist:/elsewhere"), "config.dataset"), (dict(per_class=8), "config.per_class"),
     (dict(test_per_class=3), "config.test_per_class")],
)  # fmt: skip
def test_a_dataset_that_is_not_the_configs_is_refused(data, change, named):
    """config.json and resume trust the config: a dataset passed in must be the one it names."""
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        train(TrainConfig(**(TINY | change)), progress=False, dataset=data)
