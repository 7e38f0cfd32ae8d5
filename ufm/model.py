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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ._blocks import add_scaled
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
    "ACTIVATIONS", "GradientWork", "LOSSES", "UFMParams", "UFMProblem", "check_params", "last_features", "loss",
    "loss_and_grad", "loss_and_grad_norm", "outputs", "torch_loss",
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


def check_weights(
    problem: UFMProblem,
    Ws: Sequence[np.ndarray],
    b: np.ndarray | None,
    p: int | None,
    *,
    owner: str,
    b_name: str,
) -> None:
    """Raise a ValueError naming the first of the layers ``Ws`` (``depth`` of them: hidden (p, p), the
    classifier (C, p)) or the bias ``b`` (C,) whose count, shape or presence does not fit ``problem``;
    ``owner`` and ``b_name`` name them in the message ("params", "params.b")."""
    if len(Ws) != problem.depth:
        raise ValueError(f"{owner} has {len(Ws)} layers but problem.depth = {problem.depth}")
    for k, Wk in enumerate(Ws[:-1]):
        check_shape(f"W_{k + 1} (hidden)", Wk, (p, p))
    check_shape("W (classifier)", Ws[-1], (problem.C, p))
    if problem.bias != (b is not None):
        raise ValueError(f"problem.bias = {problem.bias} but {b_name} is {'absent' if b is None else 'set'}")
    if b is not None:
        check_shape("b", b, (problem.C,))


def check_params(problem: UFMProblem, params: UFMParams) -> None:
    """Raise a ValueError naming the first array whose shape or values do not fit ``problem``."""
    p = params.H.shape[0] if params.H.ndim == 2 else None
    check_shape("H", params.H, (p, problem.n))
    check_weights(problem, params.Ws, params.b, p, owner="params", b_name="params.b")
    for name, a in zip(["H", *[f"W_{k + 1}" for k in range(problem.depth)], "b"], params.arrays()):
        check_finite(name, a)


def _forward(
    problem: UFMProblem, params: UFMParams, cols: slice = slice(None), work: GradientWork | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Layer inputs z_0..z_{L-1} (each (p, B)) and the outputs f (C, B) of the columns ``cols`` (B of
    them; all n by default), written into ``work``'s scratch when given, else fresh arrays."""
    zs = [params.H[:, cols]]
    for k, Wk in enumerate(params.Ws[:-1]):
        a = Wk @ zs[-1] if work is None else np.matmul(Wk, zs[-1], out=work.hidden(k, zs[-1].shape[1]))
        if problem.activation == "relu":
            a = np.maximum(a, 0.0, out=a if work is not None else None)
        zs.append(a)
    f = params.W @ zs[-1] if work is None else np.matmul(params.W, zs[-1], out=work.outputs(zs[-1].shape[1]))
    if params.b is not None:
        f += params.b[:, None]
    return zs, f


def last_features(problem: UFMProblem, params: UFMParams) -> np.ndarray:
    """Input of the classifier, z_{L-1} (p, n); equals H for the plain UFM."""
    return _forward(problem, params)[0][-1]


def outputs(problem: UFMProblem, params: UFMParams) -> np.ndarray:
    """Network outputs f (C, n)."""
    return _forward(problem, params)[1]


def _sq(a: np.ndarray) -> float:
    """||a||_F^2 by one dot product (no temporary the size of a)."""
    return float(np.vdot(a, a))


def _penalty(problem: UFMProblem, params: UFMParams) -> float:
    """Weight decay: sum_k lam_k/2 ||W_k||^2 + lam_h/2 ||H||^2 + lam_b/2 ||b||^2."""
    total = 0.5 * problem.lam_h * _sq(params.H)
    total += sum(0.5 * lam * _sq(Wk) for lam, Wk in zip(problem.lam_layers, params.Ws))
    if params.b is not None:
        total += 0.5 * problem.lam_b * _sq(params.b)
    return total


def loss(problem: UFMProblem, params: UFMParams) -> float:
    """Regularized loss L(H, W_1..W_L, b) of the module docstring (float64)."""
    _, f = _forward(problem, params)
    return problem.loss.value(f, problem.T) + _penalty(problem, params)


# loss_and_grad runs over blocks of columns (examples) so that its scratch, the outputs and hidden
# layers of a block ((C + L p) x B entries at depth L > 1, C x B at depth 1), stays below a quarter of
# H's size (and at least 2^16 entries): one block unless C or the depth is large (C > p / 4 at depth 1).
SCRATCH_SHARE = 0.25
SCRATCH_MIN = 2**16


class GradientWork:
    """Scratch of ``loss_and_grad`` for one problem and parameter shape, reused between calls.

    A flow evaluates the gradient thousands of times at the same shapes; fresh (C, n) and (p, n)
    temporaries would be allocated (and page-faulted) on each call. Holds the outputs f (C, B), which
    the loss overwrites with dL/df, and at depth L > 1 L hidden buffers (p, B): the layer outputs,
    which the backward pass reuses for dL/dz (docs/theory.md §13.3). B is ``cols``' block width.
    With ``feature_blocks`` it also holds two (p, B) blocks for ``loss_and_grad_norm``, counted in the
    same share of H's size, so B is smaller.
    """

    def __init__(self, problem: UFMProblem, like: UFMParams, *, feature_blocks: bool = False):
        p, n = like.H.shape
        L = problem.depth
        rows = problem.C + (L * p if L > 1 else 0) + (2 * p if feature_blocks else 0)
        width = max(1, min(n, int(max(SCRATCH_SHARE * like.H.size, SCRATCH_MIN)) // rows))
        self.blocks = [slice(i, min(i + width, n)) for i in range(0, n, width)]
        self._f = np.empty((problem.C, width))
        self._z = [np.empty((p, width)) for _ in range(L if L > 1 else 0)]
        self._h = (np.empty((p, width)), np.empty((p, width))) if feature_blocks else None

    def outputs(self, width: int) -> np.ndarray:
        """(C, width) buffer for the outputs of a block."""
        return self._f[:, :width]

    def hidden(self, k: int, width: int) -> np.ndarray:
        """(p, width) buffer k: the output of hidden layer k + 1 (k < L - 1), or the spare (k = L - 1)."""
        return self._z[k][:, :width]

    def dh_blocks(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Two (p, width) buffers for one block of dL/dH and its decay (``loss_and_grad_norm``); held
        with ``feature_blocks=True``, which counts them in the scratch's share, so blocks narrow."""
        if self._h is None:
            raise ValueError("loss_and_grad_norm needs GradientWork(problem, params, feature_blocks=True)")
        return self._h[0][:, :width], self._h[1][:, :width]


def _into(total: np.ndarray, part: np.ndarray, first: bool) -> None:
    """total = part on the first block, total += part after."""
    if first:
        total[...] = part
    else:
        total += part


def loss_and_grad(
    problem: UFMProblem,
    params: UFMParams,
    *,
    out: np.ndarray | None = None,
    work: GradientWork | None = None,
    negate: bool = False,
) -> tuple[float, UFMParams]:
    """Loss and its exact gradient by backpropagation, in float64.

    Parameters
    ----------
    problem, params : the model and the point.
    out : optional flat float64 array of ``params.ravel()``'s size; the gradient is written into it
        (``ravel`` order) and the returned gradient's arrays are views of it.
    work : optional ``GradientWork(problem, params)`` to reuse between calls at these shapes.
    negate : return -grad L (the gradient flow's velocity) instead; exactly the negative, as the sign
        enters through dL/df and the decays (the flow's field saves a pass over the state).

    Returns
    -------
    (value, grad) with ``grad`` a UFMParams of the same shapes as ``params``.

    The examples are processed in blocks of columns (``GradientWork.blocks``; the loss is a sum over
    examples), so no temporary grows with C n beyond the block; dW and db sum over the blocks.
    """
    work = GradientWork(problem, params) if work is None else work
    size = sum(a.size for a in params.arrays())
    grad = UFMParams.unravel(params, np.empty(size) if out is None else out)
    value = _backward(problem, params, grad.Ws, grad.b, work, negate, lambda cols: grad.H[:, cols])
    sign = -1.0 if negate else 1.0
    add_scaled(grad.H.reshape(-1), sign * problem.lam_h, params.H.reshape(-1))
    return value, grad


def loss_and_grad_norm(
    problem: UFMProblem, params: UFMParams, *, work: GradientWork | None = None
) -> tuple[float, float]:
    """Loss and ||grad L||_2 (all parameters), without the gradient in memory: its H part, the size of
    H, is formed one block of columns at a time in scratch (``GradientWork.dh_blocks``), where its
    decay is added and its squared norm taken, so the call holds no state-sized array (a flow's records
    at interpolated times, docs/theory.md §13.3). The decay is added to each block before it is
    squared, so there is no cancellation near a stationary point; the result equals the norm of
    ``loss_and_grad``'s gradient to rounding."""
    work = GradientWork(problem, params, feature_blocks=True) if work is None else work
    dWs = [np.empty_like(Wk) for Wk in params.Ws]
    db = None if params.b is None else np.empty_like(params.b)
    sq_h = 0.0

    def h_block(cols: slice) -> np.ndarray:
        return work.dh_blocks(cols.stop - cols.start)[0]

    def h_done(cols: slice, block: np.ndarray) -> None:
        nonlocal sq_h
        scratch = np.multiply(params.H[:, cols], problem.lam_h, out=work.dh_blocks(block.shape[1])[1])
        block += scratch
        sq_h += _sq(block)

    value = _backward(problem, params, dWs, db, work, False, h_block, h_done)
    return value, (sq_h + sum(map(_sq, dWs)) + (0.0 if db is None else _sq(db))) ** 0.5


def _backward(
    problem: UFMProblem,
    params: UFMParams,
    dWs: Sequence[np.ndarray],
    db: np.ndarray | None,
    work: GradientWork,
    negate: bool,
    h_block: Callable[[slice], np.ndarray],
    h_done: Callable[[slice, np.ndarray], None] | None = None,
) -> float:
    """The loss, with the gradient (its negative with ``negate``) written into ``dWs`` and ``db``
    (the shapes of ``params.Ws`` and ``params.b``), decays included, and the data term's dL/dH of each
    block of columns ``cols`` into ``h_block(cols)`` (p, B), then handed to ``h_done(cols, block)``
    when given: the caller adds H's decay."""
    depth, relu, n = problem.depth, problem.activation == "relu", problem.n
    value = _penalty(problem, params)
    for i, cols in enumerate(work.blocks):
        zs, f = _forward(problem, params, cols, work)
        value += problem.loss.value_and_grad_into(f, problem.T[:, cols], n, negate)  # f is now dL/df
        if db is not None:
            _into(db, f.sum(axis=1), i == 0)
        dz = f
        # Backward through W_L, then the hidden layers: z_k = s(W_k z_{k-1}). dL/dz_k goes into the
        # buffer of z_{k+1}, free once its ReLU mask is read (the spare buffer for k = L - 1).
        for k in range(depth - 1, -1, -1):
            if k < depth - 1 and relu:
                np.multiply(dz, zs[k + 1] > 0, out=dz)  # ReLU'(W_k z_{k-1}) = 1 where the output is positive
            _into(dWs[k], dz @ zs[k].T, i == 0)
            below = h_block(cols) if k == 0 else work.hidden(k, f.shape[1])
            dz = np.matmul(params.Ws[k].T, dz, out=below)
        if h_done is not None:
            h_done(cols, dz)
    sign = -1.0 if negate else 1.0
    for lam, dW, Wk in zip(problem.lam_layers, dWs, params.Ws):
        dW += (sign * lam) * Wk
    if db is not None:
        db += (sign * problem.lam_b) * params.b
    return value


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
