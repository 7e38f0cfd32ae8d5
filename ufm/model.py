"""The unconstrained-features (layer-peeled) model: problem, parameters, losses and gradients.

THEORY.md, "The unconstrained-features model". The features H are free variables; a deep variant puts
``depth - 1`` hidden layers (linear or ReLU) between them and the classifier:

    z_0 = H                          (p, n),  n = N*C examples, class-major order
    z_k = s(W_k z_{k-1})             (p, n),  k = 1..depth-1, s = identity or ReLU
    f   = W_L z_{depth-1} + b 1^T    (C, n)

    L = 1/(2NC) ||f - Y||_F^2 + sum_k lam_k/2 ||W_k||_F^2 + lam_h/2 ||H||_F^2 + lam_b/2 ||b||^2

with Y (C, n) the one-hot targets (the poster's square loss), or the cross-entropy
1/(NC) sum_i -log softmax(f_i)_{y_i} in place of the first term. For depth 1 this is the plain UFM
L(W, H, b) with lam_w = lam_1.

Here, as in the math, H is (p, n): columns are examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validation import (
    check_choice,
    check_classes,
    check_finite,
    check_nonneg,
    check_positive_int,
    check_shape,
)

ACTIVATIONS = ("linear", "relu")


@dataclass(frozen=True)
class UFMProblem:
    """A balanced C-class problem for the unconstrained-features model.

    Parameters
    ----------
    C : number of classes (>= 2).
    N : examples per class; n = N*C examples in all, ordered class-major.
    lam_w : weight decay of the layers: one number for every layer, or a tuple of ``depth``
        numbers (the last is the classifier's).
    lam_h : weight decay of the free features H.
    lam_b : weight decay of the bias (0 = unregularized). Ignored when ``bias`` is False.
    bias : whether the classifier has a bias b (C,).
    loss : ``"mse"`` (the poster's square loss) or ``"ce"`` (cross-entropy); see LOSSES.
    depth : number of weight layers after H (1 = plain UFM).
    activation : ``"linear"`` or ``"relu"`` after each hidden layer (unused when depth = 1).
    """

    C: int
    N: int
    lam_w: float | tuple[float, ...]
    lam_h: float
    lam_b: float = 0.0
    bias: bool = True
    loss: str = "mse"
    depth: int = 1
    activation: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "C", check_classes(self.C))
        object.__setattr__(self, "N", check_positive_int("N (examples per class)", self.N))
        object.__setattr__(self, "depth", check_positive_int("depth", self.depth))
        lam = self.lam_w if isinstance(self.lam_w, tuple | list) else (self.lam_w,) * self.depth
        if len(lam) != self.depth:
            raise ValueError(f"lam_w has {len(lam)} entries but depth = {self.depth}")
        object.__setattr__(self, "lam_w", tuple(check_nonneg("lam_w", v) for v in lam))
        object.__setattr__(self, "lam_h", check_nonneg("lam_h", self.lam_h))
        object.__setattr__(self, "lam_b", check_nonneg("lam_b", self.lam_b))
        check_choice("loss", self.loss, LOSSES)
        check_choice("activation", self.activation, ACTIVATIONS)

    @property
    def n(self) -> int:
        """Number of examples, N*C."""
        return self.N * self.C

    @property
    def labels(self) -> np.ndarray:
        """Class of each example, (n,), class-major: [0]*N + [1]*N + ..."""
        return np.repeat(np.arange(self.C), self.N)

    @property
    def Y(self) -> np.ndarray:
        """One-hot targets, (C, n)."""
        return np.eye(self.C)[:, self.labels]

    @property
    def lam_layers(self) -> tuple[float, ...]:
        """Weight decay of each layer, classifier last (length ``depth``)."""
        return self.lam_w  # normalized to a tuple in __post_init__


@dataclass(frozen=True)
class UFMParams:
    """A point (H, W_1, ..., W_L, b) of the model.

    Attributes
    ----------
    H : (p, n) free features, one column per example.
    Ws : layer weights, ``depth - 1`` hidden layers of shape (p, p), then the classifier (C, p).
    b : (C,) bias, or None for a bias-free model.
    """

    H: np.ndarray
    Ws: tuple[np.ndarray, ...]
    b: np.ndarray | None = field(default=None)

    @property
    def W(self) -> np.ndarray:
        """The classifier W_L, (C, p)."""
        return self.Ws[-1]

    @property
    def p(self) -> int:
        """Feature dimension."""
        return self.H.shape[0]

    def arrays(self) -> list[np.ndarray]:
        """H, the layer weights and (if present) b, in the order ``ravel`` uses."""
        return [self.H, *self.Ws] + ([] if self.b is None else [self.b])

    def ravel(self) -> np.ndarray:
        """All parameters as one float64 vector (H, W_1..W_L, b)."""
        return np.concatenate([np.ravel(a) for a in self.arrays()]).astype(float, copy=False)

    @classmethod
    def unravel(cls, like: UFMParams, theta: np.ndarray) -> UFMParams:
        """Inverse of ``ravel``: parameters shaped like ``like`` from the vector ``theta``."""
        shapes = [a.shape for a in like.arrays()]
        sizes = [int(np.prod(s)) for s in shapes]
        if theta.shape != (sum(sizes),):
            raise ValueError(f"theta must have shape ({sum(sizes)},), got {theta.shape}")
        parts = [p.reshape(s) for p, s in zip(np.split(theta, np.cumsum(sizes)[:-1]), shapes)]
        n_w = len(like.Ws)
        return cls(parts[0], tuple(parts[1 : 1 + n_w]), parts[1 + n_w] if like.b is not None else None)

    @classmethod
    def random(
        cls,
        problem: UFMProblem,
        p: int,
        *,
        scale: float = 1.0,
        rng: np.random.Generator | int | None = None,
    ) -> UFMParams:
        """Gaussian start: entries of H and of each W_k with standard deviation scale/sqrt(p), b = 0."""
        p = check_positive_int("p", p)
        rng = np.random.default_rng(rng)
        std = scale / np.sqrt(p)
        H = std * rng.standard_normal((p, problem.n))
        Ws = tuple(std * rng.standard_normal((p, p)) for _ in range(problem.depth - 1))
        Ws += (std * rng.standard_normal((problem.C, p)),)
        return cls(H, Ws, np.zeros(problem.C) if problem.bias else None)


def check_params(problem: UFMProblem, params: UFMParams) -> None:
    """Raise a ValueError naming the first array whose shape or values do not fit ``problem``."""
    if len(params.Ws) != problem.depth:
        raise ValueError(f"params has {len(params.Ws)} layers but problem.depth = {problem.depth}")
    p = params.H.shape[0] if params.H.ndim == 2 else None
    check_shape("H", params.H, (p, problem.n))
    for k, Wk in enumerate(params.Ws[:-1]):
        check_shape(f"W_{k + 1} (hidden)", Wk, (p, p))
    check_shape("W (classifier)", params.W, (problem.C, p))
    if problem.bias != (params.b is not None):
        raise ValueError(
            f"problem.bias = {problem.bias} but params.b is {'absent' if params.b is None else 'set'}"
        )
    if params.b is not None:
        check_shape("b", params.b, (problem.C,))
    for name, a in zip(["H", *[f"W_{k + 1}" for k in range(problem.depth)], "b"], params.arrays()):
        check_finite(name, a)


def _forward(problem: UFMProblem, params: UFMParams) -> tuple[list[np.ndarray], np.ndarray]:
    """Layer inputs z_0..z_{L-1} (each (p, n)) and the outputs f (C, n)."""
    zs = [params.H]
    for Wk in params.Ws[:-1]:
        a = Wk @ zs[-1]
        zs.append(np.maximum(a, 0.0) if problem.activation == "relu" else a)
    f = params.W @ zs[-1]
    if params.b is not None:
        f = f + params.b[:, None]
    return zs, f


def last_features(problem: UFMProblem, params: UFMParams) -> np.ndarray:
    """Input of the classifier, z_{L-1} (p, n); equals H for the plain UFM."""
    return _forward(problem, params)[0][-1]


def outputs(problem: UFMProblem, params: UFMParams) -> np.ndarray:
    """Network outputs f (C, n)."""
    return _forward(problem, params)[1]


def _mse(f: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
    """Poster's square loss 1/(2n) ||f - Y||_F^2 and its gradient in f, (C, n)."""
    n = f.shape[1]
    r = f - Y
    return 0.5 * float(np.sum(r * r)) / n, r / n


def _cross_entropy(f: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
    """1/n sum_i -log softmax(f_i)_{y_i} and its gradient (softmax - Y)/n, (C, n)."""
    n = f.shape[1]
    shifted = f - f.max(axis=0, keepdims=True)  # log-sum-exp without overflow
    log_z = np.log(np.exp(shifted).sum(axis=0, keepdims=True))
    log_p = shifted - log_z
    return -float(np.sum(Y * log_p)) / n, (np.exp(log_p) - Y) / n


# Data-fit terms by name: each maps (f (C, n), Y (C, n)) to (value, d value / d f).
LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]] = {
    "mse": _mse,
    "ce": _cross_entropy,
}


def _penalty(problem: UFMProblem, params: UFMParams) -> float:
    """Weight decay: sum_k lam_k/2 ||W_k||^2 + lam_h/2 ||H||^2 + lam_b/2 ||b||^2."""
    total = 0.5 * problem.lam_h * float(np.sum(params.H**2))
    total += sum(0.5 * lam * float(np.sum(Wk**2)) for lam, Wk in zip(problem.lam_layers, params.Ws))
    if params.b is not None:
        total += 0.5 * problem.lam_b * float(np.sum(params.b**2))
    return total


def loss(problem: UFMProblem, params: UFMParams) -> float:
    """Regularized loss L(H, W_1..W_L, b) of the module docstring (float64)."""
    _, f = _forward(problem, params)
    return LOSSES[problem.loss](f, problem.Y)[0] + _penalty(problem, params)


def loss_and_grad(problem: UFMProblem, params: UFMParams) -> tuple[float, UFMParams]:
    """Loss and its exact gradient by backpropagation, in float64.

    Returns
    -------
    (value, grad) with ``grad`` a UFMParams of the same shapes as ``params``.
    """
    zs, f = _forward(problem, params)
    data, g = LOSSES[problem.loss](f, problem.Y)  # g = dL/df, (C, n)
    value = data + _penalty(problem, params)
    grads_w: list[np.ndarray] = []
    db = None if params.b is None else g.sum(axis=1) + problem.lam_b * params.b
    dz = g
    # Backward through W_L, then the hidden layers: z_k = s(W_k z_{k-1}).
    for k in range(problem.depth - 1, -1, -1):
        Wk, z_in = params.Ws[k], zs[k]
        if k < problem.depth - 1 and problem.activation == "relu":
            dz = dz * (zs[k + 1] > 0)  # ReLU'(W_k z_{k-1}) = 1 where the output is positive
        grads_w.append(dz @ z_in.T + problem.lam_layers[k] * Wk)
        dz = Wk.T @ dz
    dH = dz + problem.lam_h * params.H
    return value, UFMParams(dH, tuple(reversed(grads_w)), db)


def torch_loss(problem: UFMProblem, H: Any, Ws: Any, b: Any = None) -> Any:
    """The same loss on torch tensors (autograd, any device and dtype).

    Parameters
    ----------
    H : tensor (p, n); Ws : sequence of tensors (hidden (p, p)..., classifier (C, p)); b : tensor (C,) or None.
    """
    import torch

    z = H
    for Wk in Ws[:-1]:
        z = Wk @ z
        if problem.activation == "relu":
            z = torch.relu(z)
    f = Ws[-1] @ z
    if b is not None:
        f = f + b[:, None]
    labels = torch.as_tensor(problem.labels, device=H.device)
    if problem.loss == "mse":
        Y = torch.nn.functional.one_hot(labels, problem.C).T.to(f.dtype)
        data = 0.5 * ((f - Y) ** 2).sum() / problem.n
    else:
        data = torch.nn.functional.cross_entropy(f.T, labels)
    penalty = 0.5 * problem.lam_h * (H**2).sum()
    for lam, Wk in zip(problem.lam_layers, Ws):
        penalty = penalty + 0.5 * lam * (Wk**2).sum()
    if b is not None:
        penalty = penalty + 0.5 * problem.lam_b * (b**2).sum()
    return data + penalty
