"""Closed forms of the square-loss UFM with a product of factors: deep linear layers and imbalanced
classes (docs/theory.md §7, §8; derived here).

Setting: square loss, linear layers, depth L >= 1 (m = L + 1 factors W_L ... W_1 H), decays
lam_1..lam_L (classifier last) and lam_h, any per-class counts N_c, label smoothing a, an
unregularized bias or none.

1. For a fixed product Z = W_L ... W_1 H (C, n),
   min { sum_k lam_k/2 ||W_k||^2 + lam_h/2 ||H||^2 : W_L ... W_1 H = Z } = (m/2) c sum_j s_j^(2/m),
   c = (lam_h lam_1 ... lam_L)^(1/m), s_j the singular values of Z: AM-GM over the m factors and
   sum_j s_j(A_1 ... A_m)^(2/m) <= (1/m) sum_k ||A_k||^2 (Hölder for singular values); the balanced
   factorization (every factor with singular values sqrt(c/lam_k) s_j^(1/m), aligned) attains it.
2. A free bias takes the mean of the targets, b = T 1/n, and Z fits the centred targets
   T~ = T (I - 1 1^T/n) (as §5.1 step 3); without a bias Z fits T.
3. By von Neumann's trace inequality Z keeps the singular vectors of its targets, and each target
   singular value S (absolute units) becomes the s >= 0 minimizing ::

       g(s) = (S - s)^2/(2n) + (m/2) c s^(2/m).

   For m = 2 (depth 1) this is the soft threshold s = (S - n c)_+. For m >= 3, g is not convex:
   a nonzero stationary point solves (S - s) s^(1 - 2/m) = n c, which has roots only for
   n c <= deep_root_limit(S, m) (two roots; the larger is a local minimum), where
   g(s) = (S - s)(S + (m - 1) s)/(2n). It beats s = 0 (g(0) = S^2/(2n)) exactly when
   s > (m - 2) S/(m - 1) = deep_threshold_root(S, m), i.e. when n c < deep_threshold_decay(S, m) <
   deep_root_limit(S, m): between these two a root exists and zero still wins.

Spectra of the targets: balanced, sqrt(N)(1 - a) on the C-1 centred directions (and sqrt(N) on the
mean direction without a bias); imbalanced without a bias and a = 0, sqrt(N_c) for class c (the
class indicators are the singular vectors, so each class is thresholded on its own: minority
collapse). Otherwise (imbalanced with a bias or with smoothing) the spectrum is computed numerically
(the eigenvalues of T~ T~^T), and the result says so (``spectrum = "numerical"``).

Every formula here evaluates on NumPy numbers and on SymPy symbols alike (``ufm.proofs.deep``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .closed_form import _is_symbolic, _one
from .geometry import frame_distance, mean_cosine
from .params import UFMParams

# A singular value counts as zero, and two frames as equal, below this (relative to the targets).
RANK_TOL = 1e-10


def _power(x: Any, e: Any) -> Any:
    if _is_symbolic(x, e):
        import sympy

        return sympy.Pow(x, e)
    return float(x) ** float(e)


def deep_coefficient(lam_h: Any, lam_layers: Any) -> Any:
    """c = (lam_h lam_1 ... lam_L)^(1/m), m = L + 1: the penalty of the balanced factorization is
    (m/2) c sum_j s_j^(2/m)."""
    product = lam_h
    for lam in lam_layers:
        product = product * lam
    return _power(product, _one(lam_h) / (len(lam_layers) + 1))


def deep_value(S: Any, s: Any, m: Any, n: Any, c: Any) -> Any:
    """g(s) = (S - s)^2/(2n) + (m/2) c s^(2/m): the cost of fitting target singular value S by s."""
    return (S - s) ** 2 / (2 * n) + m * c * _power(s, 2 * _one(m) / m) / 2


def deep_stationary_decay(S: Any, s: Any, m: Any) -> Any:
    """n c at which s > 0 is a stationary point of g: (S - s) s^(1 - 2/m)."""
    return (S - s) * _power(s, 1 - 2 * _one(m) / m)


def deep_value_at_root(S: Any, s: Any, m: Any, n: Any) -> Any:
    """g at a nonzero stationary point s: (S - s)(S + (m - 1) s)/(2n)."""
    return (S - s) * (S + (m - 1) * s) / (2 * n)


def deep_threshold_root(S: Any, m: Any) -> Any:
    """The root at which the nonzero stationary point ties with zero: (m - 2) S/(m - 1) (0 for m = 2)."""
    return (m - 2) * S / (m - 1)


def deep_threshold_decay(S: Any, m: Any) -> Any:
    """n c at which zero starts to win: (S - s_t) s_t^(1 - 2/m) at s_t = deep_threshold_root; S for m = 2."""
    return deep_stationary_decay(S, deep_threshold_root(S, m), m)


def deep_root_limit(S: Any, m: Any) -> Any:
    """Largest n c with a nonzero stationary point: the maximum of (S - s) s^(1 - 2/m), at
    s = (m - 2) S/(2(m - 1)); S for m = 2."""
    return deep_stationary_decay(S, (m - 2) * S / (2 * (m - 1)), m)


def deep_root(S: float, nc: float, m: int) -> float | None:
    """The larger root s of (S - s) s^(1 - 2/m) = n c (numerical, bisection to float64 precision
    for m >= 3), or None where there is none (n c > deep_root_limit)."""
    if m == 2:
        return S - nc if nc <= S else None
    low, high = (m - 2) * S / (2 * (m - 1)), S  # the left side decreases from its maximum to 0 here
    if nc > deep_stationary_decay(S, low, m):
        return None
    for _ in range(200):
        mid = 0.5 * (low + high)
        if deep_stationary_decay(S, mid, m) > nc:
            low = mid
        else:
            high = mid
        if high - low <= 4 * np.finfo(float).eps * S:
            break
    return 0.5 * (low + high)


def deep_optimal_value(S: float, nc: float, m: int) -> float:
    """The s minimizing g over s >= 0: the larger root where it beats zero, else 0 (ties go to zero)."""
    if S <= 0:
        return 0.0
    if nc == 0:
        return S
    s = deep_root(S, nc, m)
    return s if s is not None and s > deep_threshold_root(S, m) else 0.0


@dataclass(frozen=True)
class DeepOptimum:
    """Global minimizer of the square-loss UFM with linear layers and any counts (module docstring).

    Attributes
    ----------
    C, counts, depth, lam_layers (classifier last), lam_h, bias, label_smoothing : the problem.
    delta : n c / sqrt(n/C), the soft-threshold ratio of docs/theory.md §5 (C sqrt(N lam_w lam_h)
        at depth 1 and balanced classes).
    target_singular_values : (C,) singular values S_j of the (centred, with a bias) targets, descending.
    z_singular_values : (C,) singular values s_j of Z = W_L ... W_1 H kept by the threshold, descending.
    mode_threshold_c : (C,) for each target mode, the c = (lam_h prod lam_k)^(1/m) from which zero wins.
    mode_root_limit_c : (C,) the c up to which the mode has a nonzero stationary point.
    zero_wins_over_root : a mode sent to zero although it has a nonzero stationary point.
    spectrum : "closed form" (balanced; or imbalanced, no bias, a = 0) or "numerical".
    b : the bias (list), None without one.
    loss, zero_loss : the minimal loss, and that of the zero solution (W = H = 0, b = T 1/n).
    eps, f_correct, f_other : 1 - mean correct-class output; correct-class and mean wrong-class
        output, scalars when balanced, one per class (of that class's examples) when imbalanced.
    w_row_norm_sq, h_norm_sq : ||W_c||^2 of the classifier rows and ||mu_c||^2 of the class means of
        H, scalars when balanced, per class when imbalanced.
    layer_norm_sq : (L,) ||W_k||^2 of every layer, W_1 first; lam_k ||W_k||^2 = lam_h ||H||^2 (balance).
    h_total_norm_sq : ||H||^2.
    cos_w, cos_h : mean pairwise cosine of the classifier rows / centred class means (None where a
        row is zero).
    geometry : "simplex_etf", "orthogonal_frame", "rank_one", "zero" or "other" (``rank`` says more).
    rank : number of modes kept.
    regime : "collapse" (every mode kept), "zero", "partial" (balanced: only the mean mode), or
        "minority_collapse" (imbalanced: some modes sent to zero); "_zero_wins_over_root" appended
        where that applies, "_numerical_spectrum" where the spectrum is numerical.
    collapsed : every centred mode kept.
    attained : False where some but not all decays are zero and Z != 0 (the infimum is not attained).
    lam_product_max : threshold on lam_h prod lam_k (= c^m) at which the largest mode is sent to zero.
    w_scale : None (kept for the fields compared with flows).
    """

    C: int
    counts: tuple[int, ...]
    depth: int
    lam_layers: tuple[float, ...]
    lam_h: float
    bias: bool
    label_smoothing: float
    delta: float
    target_singular_values: tuple[float, ...]
    z_singular_values: tuple[float, ...]
    mode_threshold_c: tuple[float, ...]
    mode_root_limit_c: tuple[float, ...]
    zero_wins_over_root: bool
    spectrum: str
    b: list[float] | None
    loss: float
    zero_loss: float
    eps: float
    f_correct: Any
    f_other: Any
    w_row_norm_sq: Any
    h_norm_sq: Any
    layer_norm_sq: tuple[float, ...]
    h_total_norm_sq: float
    cos_w: float | None
    cos_h: float | None
    geometry: str
    rank: int
    regime: str
    collapsed: bool
    attained: bool
    lam_product_max: float
    w_scale: float | None = None
    _factors: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def min_dim(self) -> int:
        return max(self.rank, 1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_factors")
        return out

    def build(self, p: int, *, rng: np.random.Generator | int | None = None) -> UFMParams:
        """The balanced factorization of Z in dimension p >= rank: every factor has singular values
        sqrt(c/lam) s_j^(1/m) on shared orthonormal directions (a random rotation with ``rng``)."""
        if not self.attained:
            raise ValueError("with some but not all decays zero the infimum is not attained")
        if p < self.min_dim:
            raise ValueError(f"the minimizer has rank {self.rank}; it needs p >= {self.min_dim}, got {p}")
        U, s, Vt = self._factors  # (C, r), (r,), (r, n)
        r, m = len(s), self.depth + 1
        lams = (*self.lam_layers, self.lam_h)
        c = float(deep_coefficient(self.lam_h, self.lam_layers))
        weights = [np.sqrt(c / lam) if c > 0 else 1.0 for lam in lams]  # classifier .. W_1, H
        root = s ** (1.0 / m)
        gen = np.random.default_rng(rng) if rng is not None else None

        def basis() -> np.ndarray:  # (p, r) orthonormal columns
            if gen is None:
                return np.eye(p, r)
            return np.linalg.qr(gen.standard_normal((p, r)))[0]

        R = [basis() for _ in range(self.depth)]  # R[k]: output directions of z_k, k = 0..L-1
        H = R[0] @ np.diag(weights[-1] * root) @ Vt
        Ws = [R[k + 1] @ np.diag(weights[k] * root) @ R[k].T for k in range(self.depth - 1)]
        Ws.append(U @ np.diag(weights[self.depth - 1] * root) @ R[-1].T)
        b = None if self.b is None else np.array(self.b)
        return UFMParams(H, tuple(Ws), b)


def _target_spectrum(problem: Any, T: np.ndarray) -> tuple[np.ndarray, str]:
    """Singular values of the fitted targets (C,), descending, typed out where they are known."""
    C, a = problem.C, problem.label_smoothing
    if problem.balanced:
        root = np.sqrt(problem.N)
        values = [root * (1 - a)] * (C - 1) + [0.0 if problem.bias else root]
        return np.sort(values)[::-1], "closed form"
    if not problem.bias and a == 0:
        return np.sort(np.sqrt(np.array(problem.counts, float)))[::-1], "closed form"
    return np.linalg.svd(T, compute_uv=False), "numerical"


def _classify(W: np.ndarray, rank: int) -> str:
    if rank == 0:
        return "zero"
    C = W.shape[0]
    if W.shape[1] < C:  # frame_distance needs the rows in at least C - 1 (ETF) or C dimensions
        W = np.hstack([W, np.zeros((C, C - W.shape[1]))])
    norms = np.linalg.norm(W, axis=1)
    if rank == 1 and np.allclose(W, W[:1], atol=1e-9 * norms.max()):
        return "rank_one"
    if np.ptp(norms) <= 1e-9 * norms.max():
        for frame in ("simplex_etf", "orthogonal_frame"):
            if W.shape[1] >= C - (frame == "simplex_etf") and frame_distance(W, frame) < 1e-7:
                return frame
    return "other"


def _per_class(values: np.ndarray, balanced: bool) -> Any:
    return float(values.mean()) if balanced else [float(v) for v in values]


def deep_optimum(problem: Any) -> DeepOptimum:
    """Global minimizer of a square-loss UFMProblem with linear layers, any counts, an unregularized
    bias or none (module docstring; docs/theory.md §7, §8). The caller checks those assumptions."""
    C, n, L = problem.C, problem.n, problem.depth
    m = L + 1
    T = problem.T  # (C, n)
    b = T.mean(axis=1) if problem.bias else None
    fitted = T - b[:, None] if problem.bias else T
    U, _, Vt = np.linalg.svd(fitted, full_matrices=False)  # directions; values typed out where known
    S, spectrum = _target_spectrum(problem, fitted)
    c = float(deep_coefficient(problem.lam_h, problem.lam_layers))
    s = np.array([deep_optimal_value(float(Sj), n * c, m) for Sj in S])
    scale = S.max()
    kept = s > RANK_TOL * scale
    s = np.where(kept, s, 0.0)
    thresholds = tuple(float(deep_threshold_decay(float(Sj), m)) / n for Sj in S)
    limits = tuple(float(deep_root_limit(float(Sj), m)) / n for Sj in S)
    positive = S > RANK_TOL * scale
    zero_wins = bool(np.any(positive & ~kept & (np.array(limits) >= c)))
    g = [
        deep_value(float(Sj), float(sj), m, n, c) if sj > 0 else float(Sj) ** 2 / (2 * n)
        for Sj, sj in zip(S, s)
    ]
    zero_loss = float(np.sum(S**2) / (2 * n))
    rank = int(kept.sum())
    lams = (*problem.lam_layers, problem.lam_h)
    attained = rank == 0 or all(lam > 0 for lam in lams) or all(lam == 0 for lam in lams)
    factors = (U[:, kept], s[kept], Vt[kept])
    Z = factors[0] @ np.diag(factors[1]) @ factors[2]  # (C, n)
    f = Z + (b[:, None] if b is not None else 0.0)
    labels, idx = problem.labels, np.arange(n)
    counts = np.array(problem.counts)
    correct = np.bincount(labels, weights=f[labels, idx], minlength=C) / counts
    wrong = (np.bincount(labels, weights=f.sum(axis=0), minlength=C) / counts - correct) / (C - 1)
    centred_kept = kept & positive
    n_centred = int(positive.sum())
    if rank == 0:
        kind = "zero"
    elif int(centred_kept.sum()) == n_centred:
        kind = "collapse"
    else:
        kind = "partial" if problem.balanced else "minority_collapse"
    regime = (
        kind
        + ("_zero_wins_over_root" if zero_wins else "")
        + ("_numerical_spectrum" if spectrum == "numerical" else "")
    )
    opt = DeepOptimum(
        C=C, counts=tuple(problem.counts), depth=L, lam_layers=tuple(problem.lam_layers),
        lam_h=problem.lam_h, bias=problem.bias, label_smoothing=problem.label_smoothing,
        delta=n * c / np.sqrt(n / C), target_singular_values=tuple(float(v) for v in S),
        z_singular_values=tuple(float(v) for v in s), mode_threshold_c=thresholds,
        mode_root_limit_c=limits, zero_wins_over_root=zero_wins, spectrum=spectrum,
        b=None if b is None else [float(v) for v in b], loss=float(np.sum(g)), zero_loss=zero_loss,
        eps=1.0 - float(np.mean(f[labels, idx])), f_correct=_per_class(correct, problem.balanced),
        f_other=_per_class(wrong, problem.balanced), w_row_norm_sq=None, h_norm_sq=None,
        layer_norm_sq=(), h_total_norm_sq=0.0, cos_w=None, cos_h=None, rank=rank,
        # W_L = U diag(sqrt(c/lam_L) s^(1/m)) R^T: the rows' geometry is that of U diag(s^(1/m)).
        geometry=_classify(factors[0] * factors[1] ** (1.0 / m), rank),
        regime=regime, collapsed=kind == "collapse", attained=attained,
        lam_product_max=float(max(thresholds)) ** m, _factors=factors,
    )  # fmt: skip
    return _measured(opt, problem) if attained else opt


def _measured(opt: DeepOptimum, problem: Any) -> DeepOptimum:
    """Norms, cosines and geometry read off the built minimizer (p = C, no rotation)."""
    import dataclasses

    params = opt.build(max(opt.rank, 1))
    W, C = params.W, problem.C
    z = params.H
    for Wk in params.Ws[:-1]:
        z = Wk @ z
    counts = np.array(problem.counts)
    sums = np.zeros((C, z.shape[0]))
    np.add.at(sums, problem.labels, z.T)
    mu = sums / counts[:, None]  # (C, p) class means of the classifier's input
    mu_h = np.zeros((C, params.H.shape[0]))
    np.add.at(mu_h, problem.labels, params.H.T)
    mu_h /= counts[:, None]
    centred = mu - z.mean(axis=1)

    def cosine(V: np.ndarray) -> float | None:
        value = mean_cosine(V)
        return None if np.isnan(value) else value

    return dataclasses.replace(
        opt, w_row_norm_sq=_per_class((W**2).sum(axis=1), problem.balanced),
        h_norm_sq=_per_class((mu_h**2).sum(axis=1), problem.balanced),
        layer_norm_sq=tuple(float((Wk**2).sum()) for Wk in params.Ws),
        h_total_norm_sq=float((params.H**2).sum()), cos_w=cosine(W), cos_h=cosine(centred),
    )  # fmt: skip
