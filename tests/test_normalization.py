"""The normalization study (docs/theory.md §16.2): the dense-matrix norm of a convolution against the
matrix itself, the critical-point norm identity of homogeneous networks against autograd, and the
study's table on tiny runs."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ufm.datasets import load_dataset
from ufm.experiments import normalization
from ufm.experiments.normalization import conv_dense_norm, normalization_section, run_normalization
from ufm.networks import build_network
from ufm.tables import read_csv
from ufm.training import TrainConfig, measure_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("hw", "stride", "k"), [((28, 28), 2, 3), ((7, 7), 1, 3), ((14, 9), 2, 3), ((6, 5), 3, 5)]
)
def test_conv_dense_norm_is_the_norm_of_the_convolution_matrix(hw, stride, k):
    """The convolution applied to every basis image gives the dense matrix column by column."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 3, k, k))
    basis = torch.eye(3 * hw[0] * hw[1], dtype=torch.float64).reshape(-1, 3, *hw)
    T = F.conv2d(basis, torch.from_numpy(kernel), stride=stride, padding=k // 2)  # (in h w, out, h', w')
    expected = float(T.norm())
    assert conv_dense_norm(kernel, hw, stride=stride, padding=k // 2) == pytest.approx(expected, rel=1e-12)


def test_conv_dense_norm_refuses_a_matrix():
    with pytest.raises(ValueError, match="kernel must have shape"):
        conv_dense_norm(np.ones((3, 3)), (5, 5), stride=1, padding=1)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_critical_point_norm_identity_against_autograd(arch):
    """For a positively homogeneous network, <W_k, dL/dW_k> = <dL_data/dF, F> + lambda ||W_k||^2 at any
    point (Euler), i.e. lambda (||W_k||^2 - norm_W_sq_pred) with the recorded column: checked with
    autograd gradients of the objective, every layer, float64."""
    data = load_dataset("default", per_class=3, test_per_class=1)
    x, y = torch.from_numpy(data.x_train).double(), torch.from_numpy(data.y_train)
    net = build_network(arch, data.input_shape, 10, depth=3, width=6, seed=1, dtype=torch.float64)
    wd = 0.01
    row = measure_network(net, x, y, x, y, wd, singular_values=False)
    T = torch.eye(10, dtype=torch.float64)[y]
    objective = 0.5 * ((net(x) - T) ** 2).sum(1).mean() + 0.5 * wd * net.weight_norm_sq()
    grads = torch.autograd.grad(objective, [layer.W for layer in net.layers])
    for layer, g in zip(net.layers, grads):
        euler = float((layer.W.detach() * g).sum())
        assert euler == pytest.approx(
            wd * (float(layer.W.detach().norm() ** 2) - row["norm_W_sq_pred"]), rel=1e-9
        )


def test_run_normalization_on_tiny_runs(tmp_path, monkeypatch):
    """Tiny sizes: the table has the columns the report reads and rho = prod rho_k (= prod norm_W{k},
    the layers' norms) to 1e-10; the MLP is its own dense form and the CNN's dense form is larger."""
    tiny = dict(width=8, lr=3e-3, per_class=3, epochs=5, batch_size=10)
    monkeypatch.setitem(normalization.SIZES, "quick", {"mlp": tiny, "cnn": tiny | dict(lr=1e-2)})
    result = run_normalization(tmp_path, quick=True, progress=False)
    assert normalization.NORM_WDS == (0.0, TrainConfig.wd)
    rows = read_csv(result.table)
    layers = [f"rho_{k}" for k in range(1, normalization.DEPTH + 1)]
    assert {(r["arch"], r["wd"]) for r in rows} == {
        (a, w) for a in ("mlp", "cnn") for w in normalization.NORM_WDS
    }
    for r in rows:
        assert r["rho"] == pytest.approx(np.prod([r[c] for c in layers]), rel=1e-10)
        if r["wd"] == 0:  # no critical point to compare with (also None where -<dL/dF, F> <= 0)
            assert r["rho_pred"] is None
        for key in ("train_acc", "test_acc", "eps", "train_loss", "epoch"):
            assert r[key] is not None
    for r in result.final:
        if r["arch"] == "mlp":
            assert r["rho_dense"] == pytest.approx(r["rho"], rel=1e-6)
        else:
            assert r["rho_dense"] > 10 * r["rho"]  # >= (output positions)^(1/2) per convolution, minus edges
    text = normalization_section(tmp_path, 8)
    assert "rho_CNN / rho_MLP" in text and result.figure.read_bytes()[:4] == b"\x89PNG"
    history = read_csv(tmp_path / "normalization" / "mlp_wd_0" / "history.csv")
    for r, h in zip([r for r in rows if r["arch"] == "mlp" and r["wd"] == 0], history):
        assert r["rho"] == pytest.approx(np.prod([h[f"norm_W{k}"] for k in range(1, 5)]), rel=1e-10)
