"""Deep homogeneous ReLU classifiers with no biases (docs/theory.md §18): f_W(x) = W_L s(W_{L-1} ... s(W_1 x)).

Both architectures are positively homogeneous of degree L in their weights: scaling every W_k by
a_k > 0 scales f by prod_k a_k, which is what the poster's Lemma 2 and theorem use. Hence no biases,
no batch normalization, and only ReLU and average pooling (both positively homogeneous) between the
layers.

* :class:`HomogeneousMLP`: ``depth`` dense layers, ``depth - 1`` hidden layers of ``width`` units.
* :class:`HomogeneousCNN`: ``depth - 1`` 3 x 3 convolutions with ``width`` channels (local kernels;
  the first two downsample with stride 2), global average pooling, then the dense classifier W_L.

The penultimate features h(x) (the input to W_L, shape (n, p)) pass through the identity module named
``"penultimate"`` (:data:`FEATURE_LAYER`), so a forward hook on ``model.get_submodule("penultimate")``
sees them without a second forward pass.

Weight normalization (journal paper, Xu et al. 2023, "Normalization")
---------------------------------------------------------------------
With ``weight_norm=True`` each layer is stored as W_k = rho_k V_k with a scalar rho_k and ||V_k||_F = 1.
The constraint is kept by a Lagrange multiplier nu_k: gradient flow on the loss L is

    d rho_k/dt = -<dL/dW_k, V_k> - lambda rho_k,
    d V_k/dt   = -rho_k dL/dW_k + nu_k V_k,   nu_k = <rho_k dL/dW_k, V_k>,

where nu_k is the value that makes d||V_k||^2/dt = 0, so dV_k/dt = -(I - V_k V_k^T) dL/dV_k: the
gradient with its radial component removed. Training uses the discrete form of exactly this:
:meth:`HomogeneousNet.project_gradients_` removes the radial component of dL/dV_k before the optimizer
step, and :meth:`HomogeneousNet.renormalize_` divides V_k by its norm after it (the step moves V_k
along the tangent plane, which lengthens it by O(eta^2); the division is the retraction back onto
the sphere). Weight decay lambda/2 ||W_k||^2 = lambda/2 rho_k^2 then acts on rho_k alone
(:meth:`HomogeneousNet.decay_parameters`), and rho = prod_k rho_k is the product of the layers'
Frobenius norms that enters norm-based generalization bounds.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ._validation import check_choice, check_positive_int

__all__ = [
    "ARCHITECTURES",
    "FEATURE_LAYER",
    "HomogeneousCNN",
    "HomogeneousMLP",
    "HomogeneousNet",
    "build_network",
]

# Name of the identity module whose input/output are the penultimate features h(x).
FEATURE_LAYER = "penultimate"


class _WeightLayer(nn.Module):
    """One bias-free weight tensor, stored plainly (W) or normalized (rho, V with ||V||_F = 1).

    Parameters
    ----------
    shape : tuple of int
        Shape of W_k: (out, in) for dense layers, (out, in, k, k) for convolutions.
    std : float
        Standard deviation of the Gaussian initialization of W_k.
    weight_norm : bool
        Store W_k = rho_k V_k (see the module docstring).
    generator : torch.Generator
        Source of the initial weights (deterministic seeds).
    dtype : torch.dtype
    """

    def __init__(self, shape, std: float, weight_norm: bool, generator: torch.Generator, dtype: torch.dtype):
        super().__init__()
        w0 = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) * std
        self.weight_norm = weight_norm
        if weight_norm:
            norm = w0.norm()
            self.rho = nn.Parameter(norm.reshape(()))
            self.V = nn.Parameter(w0 / norm)
        else:
            self.W = nn.Parameter(w0)

    def weight(self) -> torch.Tensor:
        """The effective W_k (= rho_k V_k under weight normalization)."""
        return self.rho * self.V if self.weight_norm else self.W


class _Dense(_WeightLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class _Conv(_WeightLayer):
    def __init__(self, shape, std, weight_norm, generator, dtype, stride: int):
        super().__init__(shape, std, weight_norm, generator, dtype)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.conv2d(x, w, stride=self.stride, padding=w.shape[-1] // 2)


class HomogeneousNet(nn.Module):
    """Base class: a bias-free ReLU feature map followed by the classifier W_L (C, p = width).

    Subclasses implement :meth:`_hidden_layers` (the ``depth - 1`` layers before the classifier) and
    :meth:`features`; ``self.layers`` is the ``nn.ModuleList`` of weight layers, classifier last.
    ``forward(x)`` returns f(x), shape (n, C). The constructor's parameters are documented on the
    subclasses.
    """

    layers: nn.ModuleList

    def __init__(
        self,
        input_shape,
        C: int,
        *,
        depth: int,
        width: int,
        weight_norm: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.penultimate = nn.Identity()
        depth, width = _check_depth_width(depth, width)
        g = torch.Generator().manual_seed(seed)
        layers = self._hidden_layers(input_shape, depth, width, weight_norm, g, dtype)
        layers.append(_Dense((C, width), _classifier_std(width, C), weight_norm, g, dtype))
        self.layers = nn.ModuleList(layers)

    def _hidden_layers(self, input_shape, depth, width, weight_norm, generator, dtype) -> list[nn.Module]:
        """The ``depth - 1`` weight layers before the classifier, drawn from ``generator``."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features h(x), shape (n, p)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.penultimate(self.features(x))  # (n, p)
        return self.layers[-1](h)  # (n, C)

    @property
    def weight_norm(self) -> bool:
        return self.layers[0].weight_norm

    def weights(self) -> list[torch.Tensor]:
        """Effective weights [W_1, ..., W_L] (W_L of shape (C, p))."""
        return [layer.weight() for layer in self.layers]

    def classifier_weight(self) -> torch.Tensor:
        """W_L, shape (C, p)."""
        return self.layers[-1].weight()

    def decay_parameters(self) -> list[nn.Parameter]:
        """Parameters whose squared norms make up sum_k ||W_k||_F^2 (W_k, or rho_k under weight norm)."""
        return [layer.rho if self.weight_norm else layer.W for layer in self.layers]

    def weight_norm_sq(self) -> torch.Tensor:
        """sum_k ||W_k||_F^2, the quantity weight decay penalizes."""
        return sum((p**2).sum() for p in self.decay_parameters())

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """Remove the radial component <g, V_k> V_k of each dL/dV_k (Lagrange multiplier; no-op if plain)."""
        if not self.weight_norm:
            return
        for layer in self.layers:
            if layer.V.grad is not None:
                layer.V.grad -= (layer.V.grad * layer.V).sum() * layer.V

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Retract each V_k onto the unit sphere after a step (no-op without weight normalization)."""
        if not self.weight_norm:
            return
        for layer in self.layers:
            layer.V /= layer.V.norm()


def _hidden_std(fan_in: int) -> float:
    # He initialization: keeps the second moment of ReLU activations constant with depth, so deep
    # bias-free nets start with outputs of order one.
    return math.sqrt(2.0 / fan_in)


def _classifier_std(p: int, C: int) -> float:
    # Outputs start with second moment ~1/C per class, so the square loss starts near 1/2 + 1/2 (the
    # target's norm plus the outputs'), not at the O(C) a unit-variance output would give.
    return 1.0 / math.sqrt(p * C)


class HomogeneousMLP(HomogeneousNet):
    """Bias-free ReLU MLP: f(x) = W_L s(W_{L-1} ... s(W_1 vec(x))).

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one example (e.g. (1, 28, 28)); it is flattened to d = prod(input_shape).
    C : int
        Number of classes (rows of W_L).
    depth : int
        L, the number of weight layers (>= 2: at least one hidden layer).
    width : int
        Units per hidden layer; the features have p = width.
    weight_norm : bool
        Store each W_k as rho_k V_k (module docstring).
    seed : int
        Seed of the initial weights.
    dtype : torch.dtype
        Parameter dtype (float32 for training, float64 for exact checks).
    """

    def _hidden_layers(self, input_shape, depth, width, weight_norm, generator, dtype) -> list[nn.Module]:
        dims = [math.prod(input_shape)] + [width] * (depth - 1)
        return [
            _Dense((o, i), _hidden_std(i), weight_norm, generator, dtype) for i, o in zip(dims[:-1], dims[1:])
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return h


class HomogeneousCNN(HomogeneousNet):
    """Bias-free ReLU CNN: ``depth - 1`` local 3 x 3 convolutions, global average pooling, W_L.

    The first two convolutions have stride 2 (28 -> 14 -> 7 on MNIST). Average pooling is linear, so
    f stays positively homogeneous of degree L = depth in the weights.

    Parameters
    ----------
    input_shape : tuple of int
        (channels, height, width) of one image.
    C : int
        Number of classes.
    depth : int
        L, the number of weight layers (>= 2).
    width : int
        Channels of every convolution; the features have p = width.
    weight_norm : bool
        Store each W_k as rho_k V_k.
    seed : int
        Seed of the initial weights.
    dtype : torch.dtype
        Parameter dtype (float32 for training, float64 for exact checks).
    """

    KERNEL = 3

    def _hidden_layers(self, input_shape, depth, width, weight_norm, generator, dtype) -> list[nn.Module]:
        channels = [input_shape[0]] + [width] * (depth - 1)
        k = self.KERNEL
        return [
            _Conv(
                (o, i, k, k), _hidden_std(i * k * k), weight_norm, generator, dtype, stride=2 if j < 2 else 1
            )
            for j, (i, o) in enumerate(zip(channels[:-1], channels[1:]))
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return h.mean(dim=(2, 3))  # global average pooling: (n, width)


def _check_depth_width(depth, width) -> tuple[int, int]:
    depth, width = check_positive_int("depth", depth), check_positive_int("width", width)
    if depth < 2:
        raise ValueError(f"depth must be >= 2 (at least one layer before the classifier), got {depth}")
    return depth, width


ARCHITECTURES: dict[str, type[HomogeneousNet]] = {"mlp": HomogeneousMLP, "cnn": HomogeneousCNN}


def build_network(
    arch: str,
    input_shape: tuple[int, ...],
    C: int,
    *,
    depth: int,
    width: int,
    weight_norm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> HomogeneousNet:
    """Build a network from ``ARCHITECTURES`` by name (``"mlp"`` or ``"cnn"``); see their docstrings."""
    check_choice("arch", arch, ARCHITECTURES)
    return ARCHITECTURES[arch](
        input_shape, C, depth=depth, width=width, weight_norm=weight_norm, seed=seed, dtype=dtype
    )
