"""Data-fit terms of the UFM and of the networks, one object per loss (docs/theory.md §0.2).

Each loss knows everything the rest of the library asks of it: its value and gradient on NumPy
arrays, its value on torch tensors, its curvature in the bias direction (for the exact linear part of
the flow, docs/theory.md §13), which exact coordinate changes and reductions apply to it, and its
closed-form global minimizer, or why there is none. No other module compares loss names: a new loss
is one class here, registered in ``LOSSES``, plus its tests.

Label smoothing a in [0, 1) is a parameter of every loss: the targets are T = (1 - a) Y + (a/C) 1 1^T,
Y the one-hot targets (C, n). The poster calls symmetric quasi-interpolation "similar to label
smoothing": smoothed targets are themselves SQI targets with eps = a (C-1)/C (docs/theory.md §5.3).

Arrays here follow the math: outputs f and targets T are (C, n), columns are examples; the torch
value takes the network's (n, C) outputs, rows are examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._validation import check_choice, check_label_smoothing
from .closed_form import UFMOptimum, ufm_optimum


class NoClosedForm(ValueError):
    """The model has no closed-form minimizer in ``ufm`` (the message says which assumption fails)."""


@dataclass(frozen=True)
class Loss(ABC):
    """A data-fit term l(f_i, T_i), averaged over the n examples.

    Attributes
    ----------
    label_smoothing : a in [0, 1); the targets are (1 - a) Y + a/C.
    """

    name: ClassVar[str]
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_smoothing", check_label_smoothing(self.label_smoothing))

    def targets(self, labels: np.ndarray, C: int) -> np.ndarray:
        """Targets T = (1 - a) Y + a/C, (C, n), for integer ``labels`` (n,); C-ordered, as the outputs
        are (mixed layouts make every elementwise pass with the outputs stride through memory)."""
        a = self.label_smoothing
        return np.ascontiguousarray((1.0 - a) * np.eye(C)[:, labels] + a / C)

    def torch_targets(self, labels: Any, C: int, dtype: Any) -> Any:
        """The same targets on torch, (n, C) rows (the network's layout)."""
        import torch

        a = self.label_smoothing
        return (1.0 - a) * torch.nn.functional.one_hot(labels, C).to(dtype) + a / C

    @abstractmethod
    def value_and_grad(self, f: np.ndarray, T: np.ndarray) -> tuple[float, np.ndarray]:
        """(1/n sum_i l(f_i, T_i), d/df of it (C, n)) for outputs f and targets T, both (C, n)."""

    def value_and_grad_into(self, f: np.ndarray, T: np.ndarray, n: int, negate: bool = False) -> float:
        """sum_i l(f_i, T_i) / n over the B columns of f, T (C, B) (a block of the n examples), with f
        overwritten by the gradient of that sum (C, B), or by its negative (exactly) with ``negate``;
        the caller owns f as scratch.

        ``ufm.model.loss_and_grad`` calls this on blocks of columns. The default goes through
        ``value_and_grad`` (the mean over the block) and rescales by B/n; a loss overrides it to work
        in place, without (C, B) temporaries.
        """
        value, g = self.value_and_grad(f, T)
        share = f.shape[1] / n
        np.multiply(g, -share if negate else share, out=f)
        return value * share

    def value(self, f: np.ndarray, T: np.ndarray) -> float:
        """1/n sum_i l(f_i, T_i) for f, T of shape (C, n)."""
        return self.value_and_grad(f, T)[0]

    @abstractmethod
    def torch_value(self, f: Any, labels: Any, C: int) -> Any:
        """The same mean loss on torch: f (n, C) outputs, labels (n,) int64 (autograd, any device)."""

    @property
    @abstractmethod
    def bias_curvature(self) -> float:
        """c with d^2 L_data/db^2 = c I everywhere, or 0 where the bias Hessian varies with f."""

    @property
    def linear_residual(self) -> bool:
        """Whether dL/df = (f - T)/n, the premise of the poster's theorem (docs/theory.md §4): its
        predictions at the measured eps apply to this loss only then."""
        return False

    @property
    def mean_output_coordinates(self) -> bool:
        """Whether the flow may run in the coordinates (H, W, m = W mu_G + b) of docs/theory.md §13.2:
        exact for any loss (a change of variables), and worth it only where the bias curvature is a
        constant that the linear part then holds exactly."""
        return self.bias_curvature > 0

    def reduced_margin(self, bias: bool) -> float | None:
        """Target gap t_correct - t_wrong on the collapsed manifold where the scalar flow of
        docs/theory.md §14 is exact, or None where that manifold is not invariant."""
        return None

    def closed_form(self, problem: Any) -> UFMOptimum:
        """The global minimizer of ``problem`` (a UFMProblem) with this loss; NoClosedForm if none."""
        raise NoClosedForm(f"no closed-form minimizer is derived for the {self.description} loss")

    @property
    def description(self) -> str:
        a = self.label_smoothing
        return self.name + (f" (label smoothing {a:g})" if a else "")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label_smoothing": self.label_smoothing}


@dataclass(frozen=True)
class SquareLoss(Loss):
    """The poster's square loss 1/(2n) ||f - T||_F^2 (docs/theory.md §0.2).

    Its bias Hessian is exactly I (the data term averages over the n examples), so the flow's linear
    part holds the bias mode exactly (docs/theory.md §13.1).
    """

    name: ClassVar[str] = "mse"

    def value_and_grad(self, f: np.ndarray, T: np.ndarray) -> tuple[float, np.ndarray]:
        g = np.array(f, dtype=float)
        return self.value_and_grad_into(g, T, f.shape[1]), g

    def value_and_grad_into(self, f: np.ndarray, T: np.ndarray, n: int, negate: bool = False) -> float:
        r = np.subtract(T, f, out=f) if negate else np.subtract(f, T, out=f)  # the residual, in place
        value = 0.5 * float(np.vdot(r, r)) / n
        np.divide(f, n, out=f)
        return value

    def torch_value(self, f: Any, labels: Any, C: int) -> Any:
        T = self.torch_targets(labels, C, f.dtype)
        return 0.5 * ((f - T) ** 2).sum(dim=1).mean()

    @property
    def bias_curvature(self) -> float:
        return 1.0

    @property
    def linear_residual(self) -> bool:
        return True

    def reduced_margin(self, bias: bool) -> float | None:
        # With a bias the mean of the targets is absorbed by b and the centred targets (1 - a)(Y - 11^T/C)
        # keep the ETF manifold invariant; without one the smoothed mean 11^T a/C is not on the manifold.
        if bias:
            return 1.0 - self.label_smoothing
        return 1.0 if self.label_smoothing == 0 else None

    def closed_form(self, problem: Any) -> Any:
        """docs/theory.md §5-§8: depth 1 and balanced classes with any bias decay (UFMOptimum); linear
        layers or per-class counts with an unregularized bias or none (DeepOptimum)."""
        if problem.depth > 1 and problem.activation != "linear":
            raise NoClosedForm(
                f"no closed form is derived for {problem.activation} hidden layers (only linear ones)"
            )
        if problem.depth == 1 and problem.balanced:
            lam_b = problem.lam_b if problem.bias else 0.0
            return ufm_optimum(
                problem.C, problem.N_balanced, problem.lam_layers[0], problem.lam_h, bias=problem.bias,
                label_smoothing=self.label_smoothing, lam_b=lam_b,
            )  # fmt: skip
        if problem.bias and problem.lam_b > 0:
            raise NoClosedForm(
                f"no closed form is derived for a regularized bias (lam_b = {problem.lam_b:g}) with "
                f"{'depth ' + str(problem.depth) if problem.depth > 1 else 'per-class counts'}; "
                "it needs depth 1 and balanced classes, or lam_b = 0, or no bias"
            )
        from .closed_form_deep import deep_optimum

        return deep_optimum(problem)


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Cross-entropy 1/n sum_i -<T_i, log softmax(f_i)> (docs/theory.md §0.2).

    Its bias Hessian diag(p) - p p^T varies with the outputs (at most 1/2 in norm), so the linear part
    leaves it out (bias curvature 0) and the plain coordinates are kept.
    """

    name: ClassVar[str] = "ce"

    def value_and_grad(self, f: np.ndarray, T: np.ndarray) -> tuple[float, np.ndarray]:
        g = np.array(f, dtype=float)
        return self.value_and_grad_into(g, T, f.shape[1]), g

    def value_and_grad_into(self, f: np.ndarray, T: np.ndarray, n: int, negate: bool = False) -> float:
        # sum_c T_c = 1 for every example, so -<T_i, log softmax(f_i)> = lse_i - <T_i, s_i>, with
        # s = f - max_c f (log-sum-exp without overflow) and lse = log sum_c e^s; d/df = softmax - T.
        s = np.subtract(f, f.max(axis=0, keepdims=True), out=f)
        cross = float(np.vdot(T, s))
        e = np.exp(s, out=f)
        total = e.sum(axis=0, keepdims=True)  # (1, B)
        value = (float(np.log(total).sum()) - cross) / n
        e /= total  # softmax
        if negate:
            np.subtract(T, e, out=e)
        else:
            e -= T
        e /= n
        return value

    def torch_value(self, f: Any, labels: Any, C: int) -> Any:
        import torch

        return torch.nn.functional.cross_entropy(f, labels, label_smoothing=self.label_smoothing)

    @property
    def bias_curvature(self) -> float:
        return 0.0

    def closed_form(self, problem: Any) -> Any:
        """docs/theory.md §9: depth 1, balanced classes, with or without a bias (CEOptimum)."""
        if problem.depth != 1:
            raise NoClosedForm(f"no closed form is derived for cross-entropy at depth {problem.depth}")
        if not problem.balanced:
            raise NoClosedForm(
                f"no closed form is derived for cross-entropy with per-class counts {problem.counts}; "
                "the minority-collapse geometry [FHLS21] is not computed"
            )
        from .closed_form_ce import ce_optimum

        return ce_optimum(
            problem.C, problem.N_balanced, problem.lam_layers[0], problem.lam_h, bias=problem.bias,
            label_smoothing=self.label_smoothing,
        )  # fmt: skip


# Losses by name: the class; ``get_loss`` makes the object with its label smoothing.
LOSSES: dict[str, type[Loss]] = {"mse": SquareLoss, "ce": CrossEntropy}


def get_loss(spec: str | Loss, label_smoothing: float | None = None) -> Loss:
    """The loss object for a name in ``LOSSES`` (or a Loss itself), with label smoothing a.

    ``label_smoothing`` None keeps a given Loss's own value (0 for a name); a value that contradicts
    a given Loss's own is an error rather than a silent override.
    """
    if isinstance(spec, Loss):
        if label_smoothing is not None and check_label_smoothing(label_smoothing) != spec.label_smoothing:
            raise ValueError(
                f"label_smoothing={label_smoothing!r} contradicts the loss object's own "
                f"label_smoothing={spec.label_smoothing!r}"
            )
        return spec
    check_choice("loss", spec, LOSSES)
    return LOSSES[spec](0.0 if label_smoothing is None else label_smoothing)
