"""The unconstrained-features (layer-peeled) model: problem, losses and gradients (docs/theory.md §0).

The features H are free variables; a deep variant puts ``depth - 1`` hidden layers (linear or ReLU)
between them and the classifier:

    z_0 = H                          (p, n),  n = sum_c N_c examples, class-major order
    z_k = s(W_k z_{k-1})             (p, n),  k = 1..depth-1, s = identity or ReLU
    f   = W_L z_{depth-1} + b 1^T    (C, n)

    L = 1/n sum_i l(f_i, T_i) + sum_k lam_k/2 ||W_k||_F^2 + lam_h/2 ||H||_F^2 + lam_b/2 ||b||^2

with T (C, n) the (optionally label-smoothed) targets and l the problem's loss object
(``ufm.losses``): the poster's square loss l = 1/2 ||f_i - T_i||^2 or cross-entropy. For depth 1
this is the plain UFM L(W, H, b) with lam_w = lam_1.

Here, as in the math, H is (p, n): columns are examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
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
from .losses import LOSSES, Loss, get_loss
from .params import UFMParams

__all__ = [
    "ACTIVATIONS", "LOSSES", "UFMParams", "UFMProblem", "check_params", "last_features", "loss",
    "loss_and_grad", "outputs", "torch_loss",
]  # fmt: skip

ACTIVATIONS = ("linear", "relu")


def _counts(C: int, N: Any) -> int | tuple[int, ...]:
    """One count for every class (an int), or C per-class counts (a tuple; an int when all equal)."""
    if isinstance(N, Sequence) and not isinstance(N, str):
        if len(N) != C:
            raise ValueError(f"N has {len(N)} per-class counts but C = {C}; give one count or C counts")
        counts = tuple(check_positive_int(f"N[{c}] (examples of class {c})", v) for c, v in enumerate(N))
        return counts[0] if len(set(counts)) == 1 else counts
    if isinstance(N, np.ndarray):
        return _counts(C, N.tolist())
    return check_positive_int("N (examples per class)", N)


@dataclass(frozen=True)
class UFMProblem:
    """A C-class problem for the unconstrained-features model (docs/theory.md §0.1).

    Parameters
    ----------
    C : number of classes (>= 2).
    N : examples per class (balanced), or C per-class counts N_c; n = sum_c N_c examples in all,
        ordered class-major. Equal counts are stored as one int.
    lam_w : weight decay of the layers: one number for every layer, or a tuple of ``depth``
        numbers, W_1 first (the last is the classifier's).
    lam_h : weight decay of the free features H.
    lam_b : weight decay of the bias (0 = unregularized). Ignored when ``bias`` is False.
    bias : whether the classifier has a bias b (C,).
    loss : a name in ``ufm.losses.LOSSES`` ("mse", the poster's square loss, or "ce") or a Loss
        object; stored as the object.
    depth : number of weight layers after H (1 = plain UFM).
    activation : ``"linear"`` or ``"relu"`` after each hidden layer (unused when depth = 1).
    label_smoothing : a in [0, 1); targets (1 - a) y + a/C. Stored on the loss object as well.
    """

    C: int
    N: int | tuple[int, ...]
    lam_w: float | tuple[float, ...]
    lam_h: float
    lam_b: float = 0.0
    bias: bool = True
    loss: str | Loss = "mse"
    depth: int = 1
    activation: str = "linear"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "C", check_classes(self.C))
        object.__setattr__(self, "N", _counts(self.C, self.N))
        object.__setattr__(self, "depth", check_positive_int("depth", self.depth))
        lam = self.lam_w if isinstance(self.lam_w, tuple | list) else (self.lam_w,) * self.depth
        if len(lam) != self.depth:
            raise ValueError(f"lam_w has {len(lam)} entries but depth = {self.depth}")
        object.__setattr__(self, "lam_w", tuple(check_nonneg("lam_w", v) for v in lam))
        object.__setattr__(self, "lam_h", check_nonneg("lam_h", self.lam_h))
        object.__setattr__(self, "lam_b", check_nonneg("lam_b", self.lam_b))
        given = None if isinstance(self.loss, Loss) and self.label_smoothing == 0 else self.label_smoothing
        loss_obj = get_loss(self.loss, given)
        object.__setattr__(self, "loss", loss_obj)
        object.__setattr__(self, "label_smoothing", loss_obj.label_smoothing)
        check_choice("activation", self.activation, ACTIVATIONS)

    @property
    def counts(self) -> tuple[int, ...]:
        """Examples of each class, (C,)."""
        return (self.N,) * self.C if isinstance(self.N, int) else self.N

    @property
    def balanced(self) -> bool:
        return isinstance(self.N, int)

    @property
    def N_balanced(self) -> int:
        """The common count N of a balanced problem; a ValueError for per-class counts."""
        if not self.balanced:
            raise ValueError(
                f"this closed form exists only for balanced classes; got per-class counts {self.N}"
            )
        return self.N

    @property
    def n(self) -> int:
        """Number of examples, sum of the counts."""
        return sum(self.counts)

    @cached_property
    def labels(self) -> np.ndarray:
        """Class of each example, (n,), class-major: [0]*N_0 + [1]*N_1 + ..."""
        return np.repeat(np.arange(self.C), self.counts)

    @cached_property
    def Y(self) -> np.ndarray:
        """One-hot targets, (C, n)."""
        return np.eye(self.C)[:, self.labels]

    @cached_property
    def T(self) -> np.ndarray:
        """Targets of the loss, (C, n): (1 - a) Y + a/C with label smoothing a (= Y at a = 0)."""
        return self.loss.targets(self.labels, self.C)

    @property
    def lam_layers(self) -> tuple[float, ...]:
        """Weight decay of each layer, classifier last (length ``depth``)."""
        return self.lam_w  # normalized to a tuple in __post_init__


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
    return problem.loss.value(f, problem.T) + _penalty(problem, params)


def loss_and_grad(problem: UFMProblem, params: UFMParams) -> tuple[float, UFMParams]:
    """Loss and its exact gradient by backpropagation, in float64.

    Returns
    -------
    (value, grad) with ``grad`` a UFMParams of the same shapes as ``params``.
    """
    zs, f = _forward(problem, params)
    data, g = problem.loss.value_and_grad(f, problem.T)  # g = dL/df, (C, n)
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
    data = problem.loss.torch_value(f.T, labels, problem.C)
    penalty = 0.5 * problem.lam_h * (H**2).sum()
    for lam, Wk in zip(problem.lam_layers, Ws):
        penalty = penalty + 0.5 * lam * (Wk**2).sum()
    if b is not None:
        penalty = penalty + 0.5 * problem.lam_b * (b**2).sum()
    return data + penalty
