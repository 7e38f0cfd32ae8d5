"""A point (H, W_1, ..., W_L, b) of the unconstrained-features model (docs/theory.md §0.1).

Here, as in the math, H is (p, n): columns are examples, in class-major order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validation import check_memory, check_positive_int


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
        arrays = like.arrays()
        total = sum(a.size for a in arrays)
        if theta.shape != (total,):
            raise ValueError(f"theta must have shape ({total},), got {theta.shape}")
        # Plain slices (np.split and np.prod cost ~30 us, paid on every evaluation of a flow's field).
        ends = list(itertools.accumulate(a.size for a in arrays))
        parts = [theta[end - a.size : end].reshape(a.shape) for a, end in zip(arrays, ends)]
        n_w = len(like.Ws)
        return cls(parts[0], tuple(parts[1 : 1 + n_w]), parts[1 + n_w] if like.b is not None else None)

    @classmethod
    def random(
        cls,
        problem: Any,
        p: int,
        *,
        scale: float = 1.0,
        rng: np.random.Generator | int | None = None,
    ) -> UFMParams:
        """Gaussian start: entries of H and of each W_k with standard deviation scale/sqrt(p), b = 0."""
        p = check_positive_int("p", p)
        size = p * problem.n + (problem.depth - 1) * p * p + problem.C * (p + 1)
        # Each block is drawn, then scaled into a second array: at most twice the parameters.
        check_memory(f"a random start at n = {problem.n}, p = {p}, depth {problem.depth}", 16.0 * size,
                     "choose a smaller p")  # fmt: skip
        rng = np.random.default_rng(rng)
        std = scale / np.sqrt(p)
        H = std * rng.standard_normal((p, problem.n))
        Ws = tuple(std * rng.standard_normal((p, p)) for _ in range(problem.depth - 1))
        Ws += (std * rng.standard_normal((problem.C, p)),)
        return cls(H, Ws, np.zeros(problem.C) if problem.bias else None)
