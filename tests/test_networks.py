"""Networks: positive homogeneity, the named penultimate features, and weight normalization kept on
the unit sphere by the Lagrange-multiplier projection."""

import pytest
import torch
from torch.nn import functional as F

from ufm.networks import FEATURE_LAYER, build_network

C = 4
SHAPE = (1, 8, 8)
# float64 throughout: these are exact identities, checked to rounding.
RTOL = 1e-12


def make(arch, *, depth=3, weight_norm=False, seed=0):
    return build_network(
        arch, SHAPE, C, depth=depth, width=6, weight_norm=weight_norm, seed=seed, dtype=torch.float64
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def x():
    return torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_positively_homogeneous_of_degree_L(arch, weight_norm, x):
    """f with W_k -> a_k W_k equals prod_k a_k f (no biases, ReLU and average pooling only)."""
    net = make(arch, depth=4, weight_norm=weight_norm)
    f = net(x)
    scales = [0.5, 3.0, 1.7, 0.9]
    with torch.no_grad():
        for a, p in zip(scales, net.decay_parameters()):
            p *= a  # W_k, or rho_k under weight normalization
    torch.testing.assert_close(net(x), f * torch.prod(torch.tensor(scales)), rtol=RTOL, atol=1e-14)


def test_mlp_features_match_explicit_matrix_products(x):
    net = make("mlp")
    W1, W2, W3 = net.weights()
    h = F.relu(F.relu(x.flatten(1) @ W1.T) @ W2.T)  # (n, p)
    captured = []
    net.get_submodule(FEATURE_LAYER).register_forward_hook(lambda m, i, o: captured.append(o))
    f = net(x)
    torch.testing.assert_close(captured[0], h, rtol=RTOL, atol=0)
    torch.testing.assert_close(f, h @ W3.T, rtol=RTOL, atol=1e-15)
    assert W3.shape == (C, 6) and net.classifier_weight() is not None


def test_cnn_is_local_convolutions_then_pooling(x):
    net = make("cnn")
    W1, W2, W3 = net.weights()
    assert W1.shape == (6, 1, 3, 3) and W2.shape == (6, 6, 3, 3) and W3.shape == (C, 6)
    h = F.relu(F.conv2d(F.relu(F.conv2d(x, W1, stride=2, padding=1)), W2, stride=2, padding=1)).mean((2, 3))
    torch.testing.assert_close(net.features(x), h, rtol=RTOL, atol=0)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_weight_norm_is_the_same_function_at_init(arch, x):
    """Same seed: W_k = rho_k V_k with rho_k = ||W_k||, so both parametrizations start equal."""
    plain, normed = make(arch), make(arch, weight_norm=True)
    torch.testing.assert_close(normed(x), plain(x), rtol=1e-12, atol=1e-14)
    for layer in normed.layers:
        assert abs(float(layer.V.detach().norm()) - 1) < 1e-14
    torch.testing.assert_close(normed.weight_norm_sq(), plain.weight_norm_sq(), rtol=1e-12, atol=0)


def test_lagrange_projection_keeps_unit_norm_and_follows_tangent(x):
    """dV/dt = -(I - V V^T) dL/dV: the projected gradient is tangent, and a small step plus
    renormalization moves V by -eta (projected gradient) up to O(eta^2)."""
    net = make("mlp", weight_norm=True)
    eta = 1e-6
    V0 = [layer.V.detach().clone() for layer in net.layers]
    (net(x) ** 2).sum().backward()
    raw = [layer.V.grad.clone() for layer in net.layers]
    net.project_gradients_()
    for layer, g, v in zip(net.layers, raw, V0):
        assert abs(float((layer.V.grad * v).sum())) < 1e-12 * float(g.norm())
        torch.testing.assert_close(layer.V.grad, g - (g * v).sum() * v, rtol=1e-12, atol=1e-15)
    torch.optim.SGD(net.parameters(), lr=eta).step()
    net.renormalize_()
    for layer, v in zip(net.layers, V0):
        assert abs(float(layer.V.detach().norm()) - 1) < 1e-14
        # Renormalization divides by sqrt(1 + eta^2 ||g||^2): a second-order change.
        tangent = -eta * layer.V.grad
        err = float((layer.V.detach() - v - tangent).norm())
        assert err <= 2 * float(tangent.norm()) ** 2 + 1e-15


def test_bad_arch_and_depth():
    with pytest.raises(ValueError, match="unknown arch 'resnet'"):
        build_network("resnet", SHAPE, C, depth=3, width=4)
    with pytest.raises(ValueError, match="depth must be >= 2"):
        build_network("mlp", SHAPE, C, depth=1, width=4)
