"""The moment closure of the square-loss UFM with linear layers (docs/theory.md §11).

Write every feature as its class mean plus a deviation, h_i = mu_{y_i} + d_i with sum_{i in c} d_i = 0.
For the square loss and linear layers the outputs are f = A H + b 1^T with A = W_L ... W_1 (C, p), and
gradient flow of (H, W_1..W_L, b) sees the deviations only through their within-class scatter
S = sum_i d_i d_i^T (p, p). The flow closes exactly on

    (W_1..W_L, b, M = [mu_1..mu_C] (p, C), S (p, p)),

a state whose size does not depend on n. With R = A M + b 1^T - T_c (C, C) the residual at the class
means (T_c the classes' targets, columns t_c), D_N = diag(N_c) and K = A^T A/n + lam_h I:

    M'   = -(1/n) A^T R - lam_h M
    S'   = -(K S + S K)            = -(1/n)(A^T A S + S A^T A) - 2 lam_h S
    b'   = -(1/n) R D_N 1 - lam_b b
    W_k' = -(W_L..W_{k+1})^T G_A (W_{k-1}..W_1)^T - lam_k W_k,   G_A = (1/n)(R D_N M^T + A S),

and the loss and the full model's ||grad L|| are exact functions of the state::

    L = (1/(2n)) [tr(R D_N R^T) + tr(A S A^T)] + sum_k lam_k/2 ||W_k||^2
        + lam_h/2 (tr(M D_N M^T) + tr S) + lam_b/2 ||b||^2,
    ||grad_H L||^2 = tr(M' D_N M'^T) + tr(K S K),
    tr(K S K) = (1/n^2) <A S A^T, A A^T> + (2 lam_h/n) <A S, A> + lam_h^2 tr S.

The flow carries S as a factor L (p, p), S = L L^T, which moves exactly as the deviations do,
L' = -K L (D' = -K D for the deviations D (p, n)): then S' = -(K S + S K) follows, S stays positive
semidefinite, and the integrators' error estimate in L has the size of the one in D
(docs/theory.md §11.1), so the moment flow takes the full flow's steps. One evaluation costs
6 C p^2 flops for A L, (A L) L^T and A^T (A L) (plus p^3 per hidden layer), whatever n is.

Measures. NC1, NC2, NC3, eps and cos_w come from the state (``ufm.metrics.nc_metrics_from_moments``).
NC4 and the SQI residuals need each example's output, or at least each class's own scatter, which
the total S does not hold: they are reported as unavailable (``UNAVAILABLE``), never guessed.

Here, as in the math, M holds the (uncentred) class means as columns, (p, C); docs/theory.md §0.3's
centred M is ``M - mu_G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_positive_int
from ..geometry import mean_cosine
from ..model import UFMProblem, check_params
from ..params import UFMParams

__all__ = [
    "AUTO_MOMENTS_MIN_ENTRIES", "MomentState", "UNAVAILABLE", "moment_record", "moment_velocity",
    "moments_exact", "moments_from_params", "random_moments", "representative_params", "scatter_factor",
    "use_moments",
]  # fmt: skip

# Measures a moment flow cannot give, and why (FlowResult.unavailable).
UNAVAILABLE = {
    "nc4": "needs each example's nearest class mean and its output; the moments hold only the total "
    "within-class scatter S (docs/theory.md §11)",
    "sqi_spread": "needs each class's own scatter (the spread of A d_i by class); the moments hold only "
    "the total S",
    "sqi_correct_std": "needs each class's own scatter; the moments hold only the total S",
}

# ``moments=None`` runs the moment flow, where it is exact, once the full state H has more entries
# than this (80 MB in float64) and p < n. Below it the full flow keeps H, which NC4, dense output of
# H and ``result.params.H`` need, at a cost per evaluation that is small anyway (docs/theory.md §11).
AUTO_MOMENTS_MIN_ENTRIES = 10_000_000


@dataclass(frozen=True)
class MomentState:
    """A point (W_1..W_L, b, M, S) of the moment flow (docs/theory.md §11).

    Attributes
    ----------
    Ws : layer weights, ``depth - 1`` hidden (p, p), then the classifier (C, p).
    b : (C,) bias, or None.
    M : (p, C) class means mu_c as columns (uncentred).
    S : (p, p) within-class scatter sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, symmetric PSD.
    """

    Ws: tuple[np.ndarray, ...]
    b: np.ndarray | None
    M: np.ndarray
    S: np.ndarray

    @property
    def W(self) -> np.ndarray:
        """The classifier W_L, (C, p)."""
        return self.Ws[-1]

    @property
    def p(self) -> int:
        return self.M.shape[0]

    def arrays(self) -> list[np.ndarray]:
        """M, the layer weights, b (if present) and S, in the order ``ravel`` uses."""
        return [self.M, *self.Ws] + ([] if self.b is None else [self.b]) + [self.S]

    def ravel(self) -> np.ndarray:
        return np.concatenate([np.ravel(a) for a in self.arrays()]).astype(float, copy=False)

    @classmethod
    def unravel(cls, like: MomentState, y: np.ndarray) -> MomentState:
        """Inverse of ``ravel`` for a flat vector shaped like ``like``."""
        M, Ws, b, S = _split(like, y)
        return cls(tuple(Ws), b, M, S)


def _split(like: MomentState, y: Any) -> tuple[Any, list[Any], Any, Any]:
    """(M, Ws, b, S) views of a flat NumPy array or torch tensor in ``like``'s layout."""
    shapes = [a.shape for a in like.arrays()]
    parts, i = [], 0
    for s in shapes:
        k = int(np.prod(s))
        parts.append(y[i : i + k].reshape(s))
        i += k
    n_w = len(like.Ws)
    b = parts[1 + n_w] if like.b is not None else None
    return parts[0], parts[1 : 1 + n_w], b, parts[-1]


def moments_exact(problem: UFMProblem) -> str | None:
    """None where the moment flow is the exact flow of ``problem``, else why not."""
    if not problem.loss.linear_residual:
        return f"the moment closure needs the square loss; got {problem.loss.description}"
    if problem.depth > 1 and problem.activation != "linear":
        return f"the moment closure needs linear layers; got {problem.activation} hidden layers"
    return None


def use_moments(problem: UFMProblem, p: int, moments: bool | None) -> bool:
    """Whether a flow of ``problem`` at feature dimension p runs on the moments.

    ``moments`` True insists (ValueError where the closure is not exact), False refuses, None chooses:
    the moment flow where it is exact, p < n and the full H would exceed AUTO_MOMENTS_MIN_ENTRIES.
    """
    why = moments_exact(problem)
    if moments is None:
        return why is None and p < problem.n and p * problem.n > AUTO_MOMENTS_MIN_ENTRIES
    if moments and why is not None:
        raise ValueError(f"moments=True: {why}; use the full flow (moments=False)")
    return bool(moments)


def _class_targets(problem: UFMProblem) -> np.ndarray:
    """T_c (C, C): column c is the target of class c, (1 - a) e_c + a/C."""
    a, C = problem.label_smoothing, problem.C
    return (1.0 - a) * np.eye(C) + a / C


def moments_from_params(problem: UFMProblem, params: UFMParams) -> MomentState:
    """The moments of a full state, in one pass over the classes' columns of H (docs/theory.md §11).

    S is summed class by class from the centred columns (no H H^T - M D_N M^T cancellation).
    """
    check_params(problem, params)
    p, C = params.p, problem.C
    M = np.empty((p, C))
    S = np.zeros((p, p))
    start = 0
    for c, Nc in enumerate(problem.counts):
        Hc = params.H[:, start : start + Nc]  # (p, N_c)
        M[:, c] = Hc.mean(axis=1)
        D = Hc - M[:, c : c + 1]
        S += D @ D.T
        start += Nc
    S = 0.5 * (S + S.T)  # exactly symmetric, as the flow keeps it
    return MomentState(tuple(np.array(W, dtype=float) for W in params.Ws), _copy(params.b), M, S)


def _copy(b: np.ndarray | None) -> np.ndarray | None:
    return None if b is None else np.array(b, dtype=float)


def representative_params(
    problem: UFMProblem, state: MomentState, *, rng: np.random.Generator | int | None = 0
) -> UFMParams:
    """A full state H (p, n) with exactly these class means and scatter, for small n (tests).

    H = M E^T + L Q^T with S = L L^T (L = V sqrt(eigenvalues), p x r) and Q (n, r) orthonormal
    columns that sum to zero within every class (a random basis of that space), so that the class
    means are M and the scatter is L Q^T Q L^T = S. Needs r = rank S <= n - C.
    """
    p, C, n = state.p, problem.C, problem.n
    evals, V = np.linalg.eigh(0.5 * (state.S + state.S.T))
    keep = evals > max(p, 1) * np.finfo(float).eps * max(evals.max(), 0.0)
    r = int(keep.sum())
    if r > n - C:
        raise ValueError(f"S has rank {r} > n - C = {n - C}: no features of {n} examples have this scatter")
    labels = problem.labels
    counts = np.asarray(problem.counts)
    Z = np.random.default_rng(rng).standard_normal((n, r))
    sums = np.zeros((C, r))
    np.add.at(sums, labels, Z)
    Q, _ = np.linalg.qr(Z - (sums / counts[:, None])[labels])  # (n, r), class sums zero
    L = V[:, keep] * np.sqrt(evals[keep])  # (p, r)
    H = state.M[:, labels] + L @ Q.T
    return UFMParams(H, tuple(np.array(W) for W in state.Ws), _copy(state.b))


def random_moments(
    problem: UFMProblem, p: int, *, scale: float = 1.0, rng: np.random.Generator | int | None = None
) -> MomentState:
    """The moments of ``UFMParams.random(problem, p, scale=scale)`` drawn by their exact laws, H never formed.

    With H's entries iid N(0, s^2), s = scale/sqrt(p): the class means are independent,
    mu_c ~ N(0, s^2/N_c I_p), and independent of them (Cochran's theorem) S ~ s^2 Wishart_p(n - C, I).
    S comes from the Bartlett decomposition S = s^2 L L^T, L lower triangular with
    L_jj^2 ~ chi^2(n - C - j + 1) (j = 1..p) and N(0, 1) below the diagonal; for n - C < p (singular
    Wishart) from S = s^2 Z Z^T with Z (p, n - C) Gaussian. Weights and bias as in UFMParams.random.
    Cost O(p^3) for the Bartlett product, O(p^2 (n - C)) otherwise.
    """
    p = check_positive_int("p", p)
    rng = np.random.default_rng(rng)
    s = scale / np.sqrt(p)
    C, k = problem.C, problem.n - problem.C
    counts = np.asarray(problem.counts, dtype=float)
    M = s * rng.standard_normal((p, C)) / np.sqrt(counts)  # (p, C)
    if k >= p:
        L = np.tril(rng.standard_normal((p, p)), -1)
        L[np.diag_indices(p)] = np.sqrt(rng.chisquare(k - np.arange(p)))
    else:
        L = rng.standard_normal((p, k))
    S = s**2 * (L @ L.T)
    S = 0.5 * (S + S.T)
    Ws = tuple(s * rng.standard_normal((p, p)) for _ in range(problem.depth - 1))
    Ws += (s * rng.standard_normal((C, p)),)
    return MomentState(Ws, np.zeros(C) if problem.bias else None, M, S)


def _xp(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np
    import torch

    return torch


def scatter_factor(S: np.ndarray) -> np.ndarray:
    """A factor L (p, p) with L L^T = S: the state in which the moment flow carries the scatter.

    Cholesky where S is positive definite, else the symmetric square root V sqrt(Lambda) V^T (a
    singular Wishart scatter, n - C < p). Raises ValueError where S has an eigenvalue below
    -p eps ||S||: it is not a scatter matrix.
    """
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        evals, V = np.linalg.eigh(S)
        floor = S.shape[0] * np.finfo(float).eps * max(float(np.abs(evals).max()), np.finfo(float).tiny)
        if evals[0] < -floor:
            raise ValueError(
                f"S (within-class scatter) is not positive semidefinite: eigenvalue {evals[0]:.3g}; "
                "a scatter sum_i d_i d_i^T has none below zero"
            ) from None
        return (V * np.sqrt(np.clip(evals, 0.0, None))) @ V.T


def moment_velocity(
    problem: UFMProblem, M: Any, Ws: list[Any], b: Any, L: Any
) -> tuple[Any, tuple[Any, list[Any], Any, Any], Any]:
    """Loss, the velocities (M', [W_k'], b', L') of gradient flow, and ||grad L||^2 of the full model.

    The scatter enters through a factor L (p, p), S = L L^T (``scatter_factor``), which moves as the
    deviations do, L' = -K L (docs/theory.md §11.1); then S' = L' L^T + L L'^T = -(K S + S K), and
    tr(K S K) = ||L'||_F^2. The equations of the module docstring; NumPy arrays or torch tensors of one
    device (the same operations serve both). Returns (loss, (dM, dWs, db, dL), grad_sq).
    """
    xp = _xp(M)
    like = dict(dtype=M.dtype) if xp is np else dict(dtype=M.dtype, device=M.device)
    n, lam_h = problem.n, problem.lam_h
    N = (
        xp.asarray(np.asarray(problem.counts, dtype=float), **like)
        if xp is np
        else xp.tensor(problem.counts, **like)
    )
    Tc = (
        xp.asarray(_class_targets(problem), **like)
        if xp is np
        else xp.tensor(_class_targets(problem), **like)
    )
    # Forward: Z_k = W_k ... W_1 (p, p), A = W_L Z_{L-1} (C, p).
    Zs = [None]
    for Wk in Ws[:-1]:
        Zs.append(Wk if Zs[-1] is None else Wk @ Zs[-1])
    A = Ws[-1] if Zs[-1] is None else Ws[-1] @ Zs[-1]
    R = A @ M - Tc  # (C, C) residual at the class means
    if b is not None:
        R = R + b[:, None]
    RN = R * N  # R D_N
    AL = A @ L  # (C, p)
    AS_A = (AL * AL).sum()  # tr(A S A^T)
    trS = (L * L).sum()
    value = 0.5 * ((RN * R).sum() + AS_A) / n + 0.5 * lam_h * (((M * M) * N).sum() + trS)
    value = value + sum(0.5 * lam * (Wk * Wk).sum() for lam, Wk in zip(problem.lam_layers, Ws))
    G_A = (RN @ M.T + AL @ L.T) / n  # (C, p) = dL_data/dA = (R D_N M^T + A S)/n
    # Backward through A = W_L W_{L-1} ... W_1, as backpropagation through linear layers.
    gWs, dZ = [], G_A
    for k in range(problem.depth - 1, -1, -1):
        right = Zs[k]
        gWs.append((dZ if right is None else dZ @ right.T) + problem.lam_layers[k] * Ws[k])
        dZ = Ws[k].T @ dZ
    gWs.reverse()
    dM = -(A.T @ R) / n - lam_h * M
    dL = -(A.T @ AL) / n - lam_h * L  # -K L
    # ||grad_H L||^2 = tr(M' D_N M'^T) + tr(K S K), the second the deviations' share.
    grad_sq = ((dM * dM) * N).sum() + sum((g * g).sum() for g in gWs) + (dL * dL).sum()
    db = None
    if b is not None:
        value = value + 0.5 * problem.lam_b * (b * b).sum()
        db = -(RN.sum(axis=1) if xp is np else RN.sum(dim=1)) / n - problem.lam_b * b
        grad_sq = grad_sq + (db * db).sum()
    return value, (dM, [-g for g in gWs], db, dL), grad_sq


def _outputs_at_means(problem: UFMProblem, state: MomentState) -> np.ndarray:
    """A mu_c + b for every class, (C, C) (column c: class c's mean output)."""
    A = state.Ws[-1]
    for Wk in reversed(state.Ws[:-1]):
        A = A @ Wk
    F = A @ state.M
    return F if state.b is None else F + state.b[:, None]


def _last_means(state: MomentState, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means (p, C), scatter (p, p) and its factor P L of the classifier's input
    z_{L-1} = P H, P = W_{L-1}..W_1."""
    P = np.eye(state.p)
    for Wk in state.Ws[:-1]:
        P = Wk @ P
    return P @ state.M, P @ state.S @ P.T, P @ L


def moment_record(
    problem: UFMProblem, state: MomentState, factor: np.ndarray | None = None
) -> dict[str, float]:
    """``record_state``'s measures from the moments: loss, eps, cos_w, ||W||^2, ||H||^2 and the NC
    measures of ``nc_metrics_from_moments`` (docs/theory.md §11); those of UNAVAILABLE are left out.
    ``factor``: L with L L^T = state.S where the caller has one (the flow), else ``scatter_factor``."""
    from ..metrics import nc_metrics_from_moments

    counts = np.asarray(problem.counts, dtype=float)
    L = scatter_factor(state.S) if factor is None else factor
    value, _, _ = moment_velocity(problem, state.M, list(state.Ws), state.b, L)
    F = _outputs_at_means(problem, state)  # (C, C)
    rec = {
        "loss": float(value),
        "eps": 1.0 - float(np.diagonal(F) @ counts) / problem.n,
        "cos_w": mean_cosine(state.W),
        "norm_w_sq": float(np.sum(state.W**2)),
        "norm_h_sq": float(((state.M**2).sum(axis=0) @ counts) + np.trace(state.S)),
    }
    means, scatter, factor = _last_means(state, L)
    layers = state.Ws if problem.depth > 1 else None
    try:
        nc = nc_metrics_from_moments(
            means, scatter, problem.counts, state.W, state.b, layers=layers, factor=factor
        )
        for k, v in nc.as_dict().items():
            if k not in rec and isinstance(v, int | float) and not isinstance(v, bool):
                rec[k] = float(v)
    except ValueError:
        pass  # undefined measures are filled with NaN by the caller, as for the full flow
    return rec
