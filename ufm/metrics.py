"""Neural-collapse measurements NC1-NC4 (Papyan, Han and Donoho 2020), exact, streaming and cheap.

Conventions (docs/theory.md §0.1): sample matrices are **rows**, ``features`` (n, p); labels 0..C-1; the
classifier ``W`` is (C, p) with rows W^c and the bias ``b`` is (C,). docs/theory.md §0.3's M (p x C, columns
mu_c - mu_G) is stored here as rows, ``means - mu_G`` (C, p).

How it stays O(n p C) with no p x p matrix
------------------------------------------
Sigma_B = M M^T / C has rank at most C-1, so its pseudo-inverse lives in span(M). With the thin SVD
M = U S V^T (U: p x r orthonormal, r the numerical rank), Sigma_B^+ = C U S^-2 U^T and

    NC1 = Tr(Sigma_W Sigma_B^+) / C = 1/n sum_i || S^-1 U^T (h_i - mu_{y_i}) ||^2,

one projection of the features onto r <= C-1 directions. The nearest class mean needs only the same
projection: the part of h - mu_c orthogonal to span(M) is the same for every c. So the library makes
two passes over the data: pass 1 sums the features per class; pass 2 projects each batch onto
[U | W^T] (one matmul of width r + C) and accumulates NC1, NC4 and the output statistics. Memory is
O(C p) whatever n is.

The rank cutoff never keeps rounding noise: sum_c n_c (mu_c - mu_G) = 0 exactly, so M has rank at most
C-1 in exact arithmetic and r = min(C-1, #{s_k > max(C, p) eps s_max}). A plain ``pinv`` of the p x p
Sigma_B (relative cutoff 1e-15) keeps a noise eigenvalue and inverts it (docs/theory.md §17.2: NC1 = 5.3e12
instead of 25.5 at n = 50,000, p = 2,048, C = 100).
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _layouts
from ._blocks import block_slices
from ._threads import one_torch_thread, row_parts, side_by_side
from ._validation import (
    EqualClassMeans,
    check_classes,
    check_finite,
    check_labels,
    check_reiterable,
    check_shape,
)
from .geometry import frame_distance

# Relative rank tolerance factor, times max(rows, cols) * eps * s_max (NumPy's matrix_rank default):
# rounding in a product of length max(C, p) grows about that much.
_RANK_RTOL_FACTOR = 1.0

# One-shot nc_metrics feeds the accumulator chunks of about this many entries (16 MiB in float64):
# views of the features. Pass 2's temporaries, (r + C) x chunk rows in float64, then stay small enough
# to be reused rather than mapped afresh (measured on benchmarks/bench_metrics.py's data, CPU time, best
# of 4, load average 1.2-1.4: 2^23 entries cost 18k-57k page faults and 0.40 s / 0.82 s at (200k, 512,
# 10) float64 torch / (50k, 2048, 100) float32 NumPy, 2^21 entries 0-800 faults and 0.37 s / 0.78 s).
_CHUNK_ELEMENTS = 2**21
# Pass 1 keeps no temporaries beyond (C, p) sums, so its chunks are larger: each chunk costs a fixed
# ~0.2 ms (its checks and its hand-off to the row parts' threads), 13 times per pass at (50k, 512).
_PASS1_CHUNK_ELEMENTS = 2**23

# Float32 features are cast (pass 1) or centred (pass 2) in row blocks that stay in the CPU's L2 cache
# between the cast and its use: memory traffic stays that of reading the features once per pass.
# Pass 2 centres float32 in blocks of _BLOCK_ELEMENTS entries (1 MiB), and its product runs in such
# blocks for float64 too (half as many entries made float64 (50k, 2048, 100) 6-7% slower: 846 against
# 795 ms). Pass 1's cast writes float64, so its blocks hold half as many entries, 1 MiB of float64 too:
# float32 nc_metrics, one thread, best of 5 alternating in one process (best of 3 at p = 2048), torch /
# NumPy input, 2^17 against 2^18 entries: (50k, 512, 10) 57.6 / 57.8 against 61.8 / 61.5 ms, (200k,
# 512, 10) 223 / 218 against 235 / 245 ms, (50k, 2048, 100) 619 / 624 against 629 / 640 ms (2^16:
# 58.1 / 57.9, 231 / 230 and 613 / 611 ms; Intel Xeon VM, 2 MiB of L2 a core, 2026-12-06).
_BLOCK_ELEMENTS = 2**18
_CAST_BLOCK_ELEMENTS = 2**17

# Pass 2's statistics run inside the row parts when a part's product has at least this many entries
# ((r + C) x its rows; NCAccumulator._update_projected), else on the calling thread after the product.
# Float32 features, two threads, best of 5 alternating (2026-12-04, AMD EPYC VM), NumPy / torch input,
# in the parts against on the calling thread: (50k, 512, 10), 39k entries a part, 79.5 / 69.5 against
# 68.9 / 66.3 ms; (50k, 2048, 100), 102k entries, 948 / 923 against 964 / 979 ms; (20k, 2048, 1000),
# 1.0M entries (best of 2), 5.77 / 5.11 against 6.19 / 6.35 s, where the C x r nearest-mean product
# has a quarter of the multiply-adds of the features' own (in float64).
_PART_STATS_ELEMENTS = 2**16

# Feature dtypes measured in float32 (the big products); everything else is measured in float64.
_FLOAT32_WORK = (torch.float16, torch.bfloat16, torch.float32)


# What each measure reads at exact neural collapse onto a simplex ETF (the UFM minimizer with a bias,
# docs/theory.md §0.4, §5, §17), shown by ``ufm metrics``. Without a bias the minimizer's W is an
# orthogonal frame (the class means, centred, are still an ETF), so the W-side ETF measures and NC3
# then read the orthogonal frame's values instead.
AT_COLLAPSE: dict[str, str] = {
    "n": "-", "p": "-", "C": "-",
    "nc1": "0", "nc2_equinorm": "0", "nc2_equiangle": "0", "nc2_maxangle": "0", "etf_distance": "0",
    "sv_means": "C-1 equal, then 0", "rank_means": "C-1", "stable_rank_means": "C-1",
    "nc2_equinorm_w": "0", "nc2_equiangle_w": "0", "nc2_maxangle_w": "0 (bias-free: 1/(C-1))",
    "etf_distance_w": "0 (bias-free: > 0)", "orth_distance_w": "> 0 (bias-free: 0)",
    "nc3": "0 (bias-free: > 0)", "nc4": "0",
    "eps": "the closed form's (ufm solve)", "sqi_spread": "0", "sqi_correct_std": "0",
    "sv_w": "C-1 equal (bias-free: C)", "rank_w": "C-1 (bias-free: C)", "stable_rank_w": "C-1 (bias-free: C)",
    "rho": "-",
}  # fmt: skip


@dataclass(frozen=True)
class NCMetrics:
    """Neural-collapse measurements of features (n, p) with labels, and optionally a classifier.

    Fields that need something not given (W, outputs, layer weights, p >= C-1 for an ETF) are None.
    All "std" are population standard deviations (ddof = 0). See :func:`nc_metrics` for the formulas.

    Attributes
    ----------
    n, p, C : examples, feature dimension, classes.
    nc1 : Tr(Sigma_W Sigma_B^+) / C.
    nc2_equinorm, nc2_equiangle, nc2_maxangle : of the centred class means: std/mean of the norms,
        std of the pairwise cosines (c != c'), mean of |cos + 1/(C-1)|.
    etf_distance : Procrustes distance of the unit-Frobenius centred means from the nearest simplex ETF
        (:func:`ufm.geometry.frame_distance`); None when p < C-1.
    nc2_equinorm_w, nc2_equiangle_w, nc2_maxangle_w, etf_distance_w : the same for the rows of W.
    orth_distance_w : distance of W from the nearest orthogonal frame (the bias-free optimum); None
        when p < C.
    nc3 : || W^T/||W||_F - M/||M||_F ||_F^2.
    nc4 : fraction of examples whose argmax_c (W h + b)_c differs from argmin_c ||h - mu_c||.
    eps : 1 - mean correct-class output (symmetric quasi-interpolation, docs/theory.md §0.4).
    sqi_spread : root-mean-square deviation of the wrong-class outputs from eps/(C-1).
    sqi_correct_std : std of the correct-class outputs (0 under exact SQI).
    sv_means, rank_means, stable_rank_means : singular values of M (descending), its numerical rank
        (the r used for NC1) and stable rank ||M||_F^2/||M||_2^2.
    sv_w, rank_w, stable_rank_w : the same for W (rank cutoff max(C, p) eps s_max).
    rho : product of the Frobenius norms of the layer weights (docs/theory.md §16).
    """

    n: int
    p: int
    C: int
    nc1: float
    nc2_equinorm: float
    nc2_equiangle: float
    nc2_maxangle: float
    etf_distance: float | None
    sv_means: tuple[float, ...]
    rank_means: int
    stable_rank_means: float
    nc2_equinorm_w: float | None = None
    nc2_equiangle_w: float | None = None
    nc2_maxangle_w: float | None = None
    etf_distance_w: float | None = None
    orth_distance_w: float | None = None
    nc3: float | None = None
    nc4: float | None = None
    eps: float | None = None
    sqi_spread: float | None = None
    sqi_correct_std: float | None = None
    sv_w: tuple[float, ...] | None = None
    rank_w: int | None = None
    stable_rank_w: float | None = None
    rho: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of Python scalars, lists and None (valid JSON: no NaN can occur)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def table(self, *, at_collapse: bool = False) -> str:
        """Readable two-column table; singular values abbreviated to the leading few. With
        ``at_collapse``, a third column says what each measure reads at exact collapse
        (``AT_COLLAPSE``)."""
        rows = [f"{'measure':<18} {'value':<24} at collapse"] if at_collapse else []
        for key, value in self.as_dict().items():
            if value is None:
                text = "-"
            elif isinstance(value, list):
                head = ", ".join(f"{v:.4g}" for v in value[:5])
                text = f"[{head}{', ...' if len(value) > 5 else ''}] ({len(value)})"
            elif isinstance(value, int):
                text = str(value)
            else:
                text = f"{value:.6g}"
            rows.append(f"{key:<18} {text:<24} {AT_COLLAPSE[key]}" if at_collapse else f"{key:<18} {text}")
        return "\n".join(rows)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # Apple's MPS has no float64; everything else computes in float64 for theory checks.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_tensor(
    name: str, x: Any, device: torch.device | None = None, *, features: bool = False
) -> torch.Tensor:
    """A float tensor on ``device`` (default: its own; CPU for NumPy), in the compute dtype.

    ``features``: float32 (and half-precision) features stay float32, the dtype of the big products
    (docs/theory.md §17.9); everything else is cast to the compute dtype.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        t = _from_numpy(a)
    device = t.device if device is None else device
    dtype = _compute_dtype(device)
    return t.to(device=device, dtype=torch.float32 if features and t.dtype in _FLOAT32_WORK else dtype)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory; a copy of ``a`` when it has negative strides (``a[::-1]``), which
    torch cannot view. nc_metrics passes chunks, so the copy is one chunk's."""
    return torch.from_numpy(a if all(s >= 0 for s in a.strides) else np.ascontiguousarray(a))


def _as_labels(y: Any, b: int, device: torch.device) -> torch.Tensor:
    """Labels (b,) on ``device``, checked for shape and dtype; their values are checked by
    :class:`_Faults` without waiting for the device."""
    t = y.detach() if isinstance(y, torch.Tensor) else _from_numpy(np.asarray(y))
    if t.ndim != 1 or t.shape[0] != b:
        raise ValueError(
            f"labels must be 1-D with one entry per feature row ({b}), got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"labels must be integers 0..C-1, got dtype {t.dtype}")
    return t.to(device=device)


# Runs of equal batch sizes a pass keeps to name a bad batch's rows (a stream whose sizes change more
# often is named by batch numbers only): memory bounded whatever the stream.
_MAX_SIZE_RUNS = 1024


class _Faults:
    """Bad batches noted on the device and reported once, at the end of a pass.

    Checking a batch's values on the host (``bool(...)``, ``int(...)``) waits for a GPU to finish it;
    here each check is a device tensor holding the first failing batch (-1: none), read back once by
    :meth:`raise_first`. Labels are clamped into 0..C-1 before use, so a bad label can never index out of
    bounds while it waits to be reported. The messages add the batch's rows in the pass (the batches of
    :func:`nc_metrics` are its own chunks) from the batch sizes the host has seen (:meth:`seen`), kept
    as runs of equal sizes, at most ``_MAX_SIZE_RUNS`` of them: beyond that the rows are left out.
    """

    def __init__(self, device: torch.device):
        self._device = device
        self._first: dict[str, torch.Tensor] = {}
        self._lo = self._hi = None
        self._sizes: list[list[int]] | None = []  # the pass's batch sizes as [size, count] runs

    def seen(self, rows: int) -> None:
        """The pass's next batch has ``rows`` rows."""
        if self._sizes is None:
            return
        if self._sizes and self._sizes[-1][0] == rows:
            self._sizes[-1][1] += 1
        elif len(self._sizes) < _MAX_SIZE_RUNS:
            self._sizes.append([rows, 1])
        else:
            self._sizes = None

    def _batch(self, k: int) -> str:
        """Batch number k (from 1) with its rows in the pass, when the sizes are known."""
        start, before = 0, k - 1  # rows and batches before batch k
        for size, count in self._sizes or ():
            if before < count:
                start += before * size
                return f"batch {k} (rows {start}..{start + size - 1})"
            start, before = start + size * count, before - count
        return f"batch {k}"

    def note(self, what: str, bad: torch.Tensor, batch: int) -> None:
        """``bad`` (0-d bool) is whether batch number ``batch`` failed check ``what``."""
        first = self._first.get(what)
        if first is None:
            first = torch.full((), -1, dtype=torch.int64, device=self._device)
        self._first[what] = torch.where((first < 0) & bad, batch, first)

    def labels(self, t: torch.Tensor, C: int, batch: int) -> torch.Tensor:
        """int64 labels in 0..C-1 (clamped), noting non-integers and the range seen."""
        if t.is_floating_point():
            self.note("non-integer labels", (t != torch.round(t)).any(), batch)
        y = t.to(torch.int64)
        if y.numel():
            lo, hi = torch.aminmax(y)
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
            self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
            self.note("labels out of range", (lo < 0) | (hi >= C), batch)
        return y.clamp(0, C - 1)

    def raise_first(self, C: int) -> None:
        """ValueError for the first check that failed (one host read per check)."""
        for what, first in self._first.items():
            k = int(first)
            if k < 0:
                continue
            batch = self._batch(k)
            if what == "labels out of range":
                raise ValueError(
                    f"labels out of range: found {int(self._lo)}..{int(self._hi)}, expected 0..{C - 1}"
                    f" (first in {batch})"
                )
            if what == "non-integer labels":
                raise ValueError(f"labels must be integers 0..C-1 ({batch} has non-integer values)")
            if what == "products":
                raise ValueError(
                    f"features {batch} of the second pass has non-finite projections [U | W^T]^T h:"
                    " non-finite entries, or entries so large that the product overflows; rescale the features"
                )
            beyond = " (or its class sums pass the float64 range, 1.8e308)" if what == "features" else ""
            raise ValueError(f"{what} {batch} has non-finite entries (NaN or inf){beyond}")
        self._first.clear()
        self._sizes = []


def _numpy(name: str, x: Any) -> np.ndarray:
    """A finite float64 NumPy copy of a small array or tensor (W, b, layer weights)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return check_finite(name, x)


def _rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Numerical rank: singular values above max(shape) eps s_max (NumPy's matrix_rank cutoff)."""
    return int((s > _RANK_RTOL_FACTOR * max(shape) * np.finfo(float).eps * s[0]).sum()) if s[0] > 0 else 0


def _nc2(name: str, V: np.ndarray) -> tuple[float, float, float]:
    """(equinorm, equiangle, maxangle) of the rows of V (C, p); population std (ddof = 0)."""
    C = V.shape[0]
    norms = np.linalg.norm(V, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{name} has zero vectors for classes {zero[:10].tolist()}: cosines undefined")
    cos = (V @ V.T) / np.outer(norms, norms)  # (C, C)
    off = cos[~np.eye(C, dtype=bool)]  # the C(C-1) pairs c != c'
    return (
        float(norms.std() / norms.mean()),
        float(off.std()),
        float(np.abs(off + 1.0 / (C - 1)).mean()),
    )


def _frame_distances(coords: np.ndarray, p: int, frames: Sequence[str]) -> list[float | None]:
    """Distances of C vectors from the frames, None where the frame does not fit in R^p.

    ``coords`` (C, min(C, p)) are the vectors in an orthonormal basis of their span (A diag(s) of a
    thin SVD, or :func:`_row_coordinates`): the distances are unchanged, and the SVDs inside stay
    C x C.
    """
    C = coords.shape[0]
    return [frame_distance(coords, f) if p >= (C - 1 if f == "simplex_etf" else C) else None for f in frames]


class _BatchMoments(NamedTuple):
    """A batch of values: its count, its sum, and its sum of squared deviations about its own mean."""

    count: int
    total: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(
        cls, count: int, total: torch.Tensor, m2_about: Callable[[torch.Tensor], torch.Tensor]
    ) -> _BatchMoments:
        """From ``count`` values with sum ``total``; ``m2_about(m)`` = sum (x - m)^2."""
        return cls(count, total, m2_about(total / count) if count else torch.zeros_like(total))


class _PartStats(NamedTuple):
    """Pass 2's sums over the examples of one row part of a batch (0-d tensors on the device)."""

    bad_products: torch.Tensor  # bool: a non-finite product entry
    nc1_sum: torch.Tensor  # sum_i ||S^-1 U^T (h_i - mu_{y_i})||^2
    disagree: torch.Tensor | None  # int64: examples whose classifier and nearest mean disagree
    correct: _BatchMoments | None  # the correct-class outputs
    wrong: _BatchMoments | None  # the wrong-class outputs


class _Moments:
    """Count, mean and sum of squared deviations of a stream of values (Chan et al.'s parallel update).

    Kept as 0-d tensors on the data's device, so a GPU run never waits on a host copy.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.count = 0
        self.mean = torch.zeros((), device=device, dtype=dtype)
        self.m2 = torch.zeros((), device=device, dtype=dtype)

    def merge(self, batch: _BatchMoments) -> None:
        """Merge a batch's count, sum and sum of squared deviations about its own mean."""
        count, total, m2_b = batch
        if count == 0:
            return
        mean_b = total / count
        n = self.count + count
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (count / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * count / n)
        self.count = n

    def rms_about(self, value: float) -> float:
        """sqrt(1/count sum (x - value)^2)."""
        return float(np.sqrt(float(self.m2) / self.count + (float(self.mean) - value) ** 2))


class NCAccumulator:
    """Two-pass streaming computation of :func:`nc_metrics`, memory O(C p) independent of n.

    Feed every batch once with :meth:`update`, call :meth:`end_first_pass`, feed the **same** batches
    again (any order, any split), then call :meth:`result`. Batches may be NumPy arrays or torch
    tensors on any device; the accumulator works on the device of the first batch, so a GPU run stays
    on the GPU, and never reads a value back inside :meth:`update` (bad values are reported at the end
    of the pass, naming the first bad batch). Float32 features keep float32 products, float64 sums
    (docs/theory.md §17.9); everything else is float64. On a CPU a batch's class sums and product run
    in ``torch.get_num_threads()`` row parts side by side, one torch thread each (§17.10). The result
    equals the one-shot :func:`nc_metrics` up to summation order (about 1e-13 relative).

    Parameters
    ----------
    C : number of classes; may be omitted when W is given (C = W.shape[0]).
    W : (C, p) classifier, optional.
    b : (C,) bias, optional (needs W).
    layers : sequence of layer weight matrices for rho = prod_k ||W_k||_F, optional.

    Examples
    --------
    >>> acc = NCAccumulator(C=10, W=W, b=b)
    >>> for x, y in batches: acc.update(x, y)
    >>> acc.end_first_pass()
    >>> for x, y in batches: acc.update(x, y)
    >>> metrics = acc.result()
    """

    def __init__(
        self,
        C: int | None = None,
        *,
        W: Any = None,
        b: Any = None,
        layers: Sequence[Any] | None = None,
    ):
        if W is None and C is None:
            raise ValueError("give the number of classes C, or the classifier W (C, p)")
        if b is not None and W is None:
            raise ValueError("a bias b needs the classifier W")
        self._W = None if W is None else _numpy("W", W)
        if self._W is not None:
            if self._W.ndim != 2:
                raise ValueError(f"W must be a (C, p) matrix, got shape {self._W.shape}")
            if C is not None and self._W.shape[0] != C:
                raise ValueError(f"W must have C = {C} rows, got shape {self._W.shape}")
            C = self._W.shape[0]
        self.C = check_classes(C)
        self._b = None if b is None else check_shape("b", _numpy("b", b), (self.C,))
        self._rho = None
        if layers is not None:
            if len(layers) == 0:
                raise ValueError("layers is empty: rho needs at least one weight matrix")
            norms = [np.linalg.norm(_numpy(f"layers[{k}]", A)) for k, A in enumerate(layers)]
            self._rho = float(np.prod(norms))
        self.p: int | None = None if self._W is None else self._W.shape[1]
        self._device: torch.device | None = None
        self._pass = 1
        self._batch = 0
        self._n_pass2 = 0

    @property
    def pass_number(self) -> int:
        """1 while class sums are collected, 2 after :meth:`end_first_pass`."""
        return self._pass

    def _start(self, X: torch.Tensor) -> None:
        # _dtype: the accumulators' (float64; float32 on MPS); _work: the big products' (the features').
        self._device, self._dtype, self._work = X.device, _compute_dtype(X.device), X.dtype
        self.p = X.shape[1] if self.p is None else self.p
        self._counts = torch.zeros(self.C, dtype=torch.int64, device=X.device)
        self._sums = torch.zeros(self.C, self.p, dtype=self._dtype, device=X.device)  # (C, p)
        # Scratch blocks of each row part: pass 1's casts (_cast), pass 2's centred features (_centred).
        self._cast_buffers: dict[int, torch.Tensor] = {}
        self._centre_buffers: dict[int, torch.Tensor] = {}
        self._faults = _Faults(X.device)

    def update(self, features: Any, labels: Any, outputs: Any = None) -> None:
        """Add a batch: features (b, p), labels (b,), optional network outputs (b, C).

        In pass 1 only features and labels are used; outputs (used in pass 2 for NC4 when W is
        absent, and for eps and the SQI spread) may be passed in both passes.
        """
        X = _as_tensor("features", features, self._device, features=True)
        if X.ndim != 2:
            raise ValueError(f"features must be a (n, p) matrix of rows, got shape {tuple(X.shape)}")
        if self._device is None:
            self._start(X)
        if X.shape[1] != self.p:
            raise ValueError(f"features must have p = {self.p} columns, got shape {tuple(X.shape)}")
        if X.dtype != self._work:
            X = X.to(self._work)  # one dtype for both passes: the basis is stored in it
        t = _as_labels(labels, X.shape[0], self._device)
        self._batch += 1
        self._faults.seen(X.shape[0])
        if X.device.type != "cpu":
            y = self._faults.labels(t, self.C, self._batch)
            self._update_pass(X, y, outputs, [slice(0, X.shape[0])])
            return
        # On the CPU the batch's O(b p) work (class sums, the product) runs in row parts side by side,
        # one per torch thread the caller allows, each part on one thread (ufm._threads.side_by_side):
        # no library's pool is woken, by the big work or by the some 30 small torch calls per batch,
        # whose multithreaded calls would cost more than their work on a busy CPU.
        parts = row_parts(X.shape[0], _rows_per(self.p, _BLOCK_ELEMENTS), torch.get_num_threads())
        with one_torch_thread():
            y = self._faults.labels(t, self.C, self._batch)
            self._update_pass(X, y, outputs, parts)

    def _update_pass(self, X: torch.Tensor, y: torch.Tensor, outputs: Any, parts: list[slice]) -> None:
        if self._pass == 1:
            self._update_sums(X, y, parts)
        else:
            self._update_projected(X, y, outputs, parts)

    def _update_sums(self, X: torch.Tensor, y: torch.Tensor, parts: list[slice]) -> None:
        # Class sums in float64 of the exact float32 values: each block is cast while it is in cache.
        def part_sums(part: slice, i: int) -> torch.Tensor:
            sums = torch.zeros_like(self._sums)  # (C, p)
            Xp, yp = X[part], y[part]
            for rows in _row_blocks(Xp, self._dtype):
                sums.index_add_(0, yp[rows], self._cast(Xp[rows], i))
            return sums

        sums = functools.reduce(torch.add, side_by_side(part_sums, parts))
        self._faults.note("features", _non_finite(sums), self._batch)
        self._sums += sums
        self._counts += torch.bincount(y, minlength=self.C)

    def _cast(self, X: torch.Tensor, part: int) -> torch.Tensor:
        """A block of features in the accumulators' dtype: itself, or cast. On the CPU the cast goes into
        a buffer kept for each row part rather than a fresh float64 block each time (pass 1's loop over
        float32 (50k, 512) features, blocks of 512 rows: 27.5 against 30.2 ms, best of 7, one thread),
        of ``_CAST_BLOCK_ELEMENTS`` entries."""
        if X.dtype == self._dtype:
            return X
        if X.device.type != "cpu":
            return X.to(self._dtype)
        buffer = self._buffer(self._cast_buffers, part, self._dtype, _CAST_BLOCK_ELEMENTS)
        return buffer[: X.shape[0]].copy_(X)

    def _buffer(
        self, buffers: dict[int, torch.Tensor], part: int, dtype: torch.dtype, elements: int
    ) -> torch.Tensor:
        """Row part ``part``'s scratch block (rows of an ``elements`` block, p) in ``dtype``, made once."""
        if part not in buffers:
            buffers[part] = torch.empty(_rows_per(self.p, elements), self.p, dtype=dtype)
        return buffers[part]

    def end_first_pass(self) -> None:
        """Fix the class means and the basis of span(M); the next updates are pass 2."""
        if self._pass != 1:
            raise ValueError("end_first_pass called twice")
        if self._device is None:
            raise ValueError("no examples: call update with at least one batch first")
        self._faults.raise_first(self.C)
        counts = self._counts.cpu().numpy()
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise ValueError(
                f"classes with no examples: {empty[:10].tolist()}{' ...' if empty.size > 10 else ''}"
            )
        self.n = int(counts.sum())
        # Scale (docs/theory.md §17.8): everything after the class sums is computed for the features
        # divided by 2^e, e the binary exponent of the largest |class mean|, and W divided by 2^e_W, its
        # own; both exact. Squares and products of the class means then stay in range (features of
        # 1e200 or 1e-200), the results are bit for bit the same for 2^k h, and no pass over the
        # features is spent on it: the big products see the features as they are.
        sums = self._sums.cpu().double().numpy()
        self._e = _binary_exponent(sums / counts[:, None])
        sums = np.ldexp(sums, -self._e)
        means = sums / counts[:, None]  # (C, p) class means (scaled)
        self._mu_G = sums.sum(axis=0) / self.n  # (p,) mean over all examples (scaled)
        M = means - self._mu_G  # (C, p): the M of docs/theory.md §0.3, as rows (scaled)
        A, s, Vt = np.linalg.svd(M, full_matrices=False)  # M = A diag(s) Vt
        # Centring C equal means leaves rounding noise ~eps times their size, not exact zeros.
        if s[0] <= _RANK_RTOL_FACTOR * max(M.shape) * np.finfo(float).eps * np.abs(means).max():
            raise EqualClassMeans(
                "all class means are equal (to rounding): the between-class covariance is zero"
            )
        # sum_c n_c M_c = 0 exactly, so rank <= C-1; the C-th singular value is rounding noise.
        r = min(self.C - 1, _rank(s, M.shape))
        self._M, self._sv_means, self._r, self._coords = M, s, r, A * s
        dev = dict(device=self._device, dtype=self._dtype)
        U = Vt[:r].T  # (p, r) orthonormal basis of span(M)
        self._e_W = e_W = 0 if self._W is None else _binary_exponent(self._W)
        basis = U if self._W is None else np.hstack([U, np.ldexp(self._W, -e_W).T])  # (p, r + C)
        # (r + C, p) for the product computed basis first, and (p, r + C) for rows first (ufm._layouts).
        self._basis_t = torch.as_tensor(basis.T.copy(), device=self._device, dtype=self._work)
        self._basis = self._basis_t.T.contiguous()
        # Float32 features are centred by m = mu_G rounded to float32 before the float32 product, so
        # its rounding is relative to h - m, not to h (docs/theory.md §17.9); float64 needs no shift.
        mu_G = np.ldexp(self._mu_G, self._e)  # (p,) in the features' units
        shift = np.zeros_like(mu_G) if self._work == self._dtype else mu_G.astype(np.float32)
        self._shift = None if self._work == self._dtype else torch.as_tensor(shift, device=self._device)
        # Pass 2 works on the product's rows (one per basis vector, one column per example), as columns:
        u_G = np.ldexp(mu_G - shift, -self._e) @ U  # (r,) projected mu_G - m
        self._minus_u_G = torch.as_tensor(-u_G[:, None], **dev)  # (r, 1)
        Q = A[:, :r] * s[:r]  # (C, r) = M U, projected centred means
        self._Q = torch.as_tensor(Q, **dev)
        self._Q_t = torch.as_tensor(Q.T.copy(), **dev)  # (r, C)
        self._minus_half_q2 = torch.as_tensor(-0.5 * (Q**2).sum(axis=1)[:, None], **dev)  # (C, 1)
        self._s2 = torch.as_tensor(s[:r] ** 2, **dev)  # (r,)
        # W h + b = W (h - m) + (W m + b): the product sees the centred features.
        if self._W is not None:
            bias = (0 if self._b is None else self._b) + self._W @ shift
            self._bias_col = torch.as_tensor(bias[:, None], **dev)  # (C, 1)
        self._nc1_sum = torch.zeros((), **dev)
        self._disagree = torch.zeros((), dtype=torch.int64, device=self._device)
        self._counts2 = torch.zeros_like(self._counts)
        self._correct = _Moments(**dev)
        self._wrong = _Moments(**dev)
        self._outputs_given: bool | None = None
        self._pass = 2
        self._batch = 0

    def _update_projected(self, X: torch.Tensor, y: torch.Tensor, outputs: Any, parts: list[slice]) -> None:
        """Add a batch's NC1, NC4 and output moments from its product G_t (r + C, b), :meth:`_project_parts`.

        The statistics (:meth:`_part_stats`) work on (k, b) arrays, one column per example: the product
        comes out in that layout, and reductions over a column's k entries then run along contiguous
        rows. They are some 30 small torch calls. On a CPU they run inside the row parts, after each
        part's product, when a part holds at least ``_PART_STATS_ELEMENTS`` product entries; below
        that, on the calling thread after the product, since each call's hand-off of Python's lock
        then costs more than its work (float32 (50k, 512, 10), best of 12 alternating: 52-57 ms on one
        thread against 66-78 ms in parts, 2026-12-03).
        """
        out_t = None
        if outputs is not None:
            out = check_shape("outputs", _as_tensor("outputs", outputs, self._device), (X.shape[0], self.C))
            self._faults.note("outputs", _non_finite(out), self._batch)
            out_t = out.T
        if self._outputs_given is None:
            self._outputs_given = out_t is not None
        elif self._outputs_given != (out_t is not None):
            raise ValueError("outputs were given for some batches of the second pass but not for others")
        k = self._basis_t.shape[0]
        G_t = torch.empty(k, X.shape[0], dtype=X.dtype, device=X.device)

        def part_stats(part: slice, i: int) -> _PartStats:
            return self._part_stats(G_t[:, part], y[part], None if out_t is None else out_t[:, part])

        if len(parts) > 1 and k * (parts[0].stop - parts[0].start) >= _PART_STATS_ELEMENTS:
            product = self._product_layout(X)

            def project_and_sum(part: slice, i: int) -> _PartStats:
                self._project(X, G_t, product, part, i)
                return part_stats(part, i)

            stats = side_by_side(project_and_sum, parts)
        else:
            self._project_parts(X, G_t, parts)
            stats = [part_stats(slice(None), 0)]
        for st in stats:
            self._faults.note("products", st.bad_products, self._batch)
            self._nc1_sum += st.nc1_sum
            if st.disagree is not None:
                self._disagree += st.disagree
                self._correct.merge(st.correct)
                self._wrong.merge(st.wrong)
        self._counts2 += torch.bincount(y, minlength=self.C)
        self._n_pass2 += X.shape[0]

    def _part_stats(self, G_t: torch.Tensor, y: torch.Tensor, out_t: torch.Tensor | None) -> _PartStats:
        """Pass 2's sums over the examples of G_t (r + C, b), the product's columns, with their labels y
        (b,) and outputs out_t (C, b) if given."""
        r, b = self._r, G_t.shape[1]
        # The product's rows times 2^-e and 2^e_W (exact) are U^T (h - m) / 2^e and W (h - m), in float64.
        Pc = torch.add(self._minus_u_G, G_t[:r], alpha=_pow2(-self._e))  # (r, b) = U^T (h - mu_G) / 2^e
        # NC1: 1/n sum_i ||S^-1 U^T (h_i - mu_{y_i})||^2, with U^T (mu_c - mu_G) = Q_c.
        # (The sign of Z is immaterial; gather reads Q_t[:, y] faster than indexing.)
        Z = self._Q_t.gather(1, y.expand(r, b)).sub_(Pc)  # (r, b)
        nc1_sum = (_row_sum_squares(Z) / self._s2).sum()
        # (C, b): W h + b, or the outputs without W.
        logits_t = out_t if self._W is None else torch.add(self._bias_col, G_t[r:], alpha=_pow2(self._e_W))
        if logits_t is None:
            return _PartStats(_non_finite(G_t), nc1_sum, None, None, None)
        # argmin_c ||h - mu_c||^2 = argmax_c <Pc, Q_c> - ||Q_c||^2/2 (the part off span(M) is common).
        nearest = _first_argmax(torch.addmm(self._minus_half_q2, self._Q, Pc))  # (b,)
        disagree = (_first_argmax(logits_t) != nearest).sum()
        # eps and the SQI spread use the network's outputs when given, else W h + b.
        correct, wrong = _output_moments(logits_t if out_t is None else out_t, y)
        return _PartStats(_non_finite(G_t), nc1_sum, disagree, correct, wrong)

    def _product_layout(self, X: torch.Tensor) -> _layouts.Layout:
        """The layout of pass 2's product for blocks like those of X (:mod:`ufm._layouts`), timed on the
        CPU on X's first full block the first time its key is met."""
        product = _layouts.basis_first
        block = _rows_per(self.p, _BLOCK_ELEMENTS)
        if X.device.type == "cpu" and X.shape[0] >= block:
            k = self._basis_t.shape[0]

            def run(layout: _layouts.Layout) -> None:  # only while the key is being timed
                out = torch.empty(k, block, dtype=X.dtype)
                layout(out, self._basis_t, self._basis, self._centred(X[:block], 0))

            key = (str(X.dtype), self.p, k, block)
            product = _layouts.faster_layout(key, product, _layouts.rows_first, run)
        return product

    def _project_parts(self, X: torch.Tensor, G_t: torch.Tensor, parts: list[slice]) -> None:
        """G_t (r + C, b) = [U | W^T]^T (h - m) for the rows h of X, in the features' dtype: the only
        O(b p) work of pass 2, the row ``parts`` side by side on a CPU (:meth:`update`); one product on a
        GPU, whose kernels need no blocking. An overflow is not warned about: the non-finite result is
        reported as a fault of the batch (:meth:`_update_projected`)."""
        if X.device.type != "cpu":
            torch.mm(self._basis_t, self._centred(X, 0).T, out=G_t)
            return
        product = self._product_layout(X)
        side_by_side(lambda part, i: self._project(X, G_t, product, part, i), parts)

    def _project(
        self, X: torch.Tensor, G_t: torch.Tensor, product: _layouts.Layout, part: slice, i: int
    ) -> None:
        """Row part ``part`` (number ``i``) of :meth:`_project_parts` on a CPU: in row blocks that stay in
        cache, each centred (float32) and multiplied there (float64 at (200k, 512), r + C = 19: blocks
        of 256-1024 rows 0.20-0.23 s, chunks of 16384 rows 0.29-0.30 s, load average 1.0), in the
        layout ``product`` (:meth:`_product_layout`)."""
        for rows in block_slices(part.start, part.stop, _rows_per(self.p, _BLOCK_ELEMENTS)):
            product(G_t[:, rows], self._basis_t, self._basis, self._centred(X[rows], i))

    def _centred(self, X: torch.Tensor, part: int) -> torch.Tensor:
        """h - m for a block of float32 features (docs/theory.md §17.9), into row part ``part``'s scratch
        block on the CPU; X itself for float64."""
        if self._shift is None:
            return X
        if X.device.type != "cpu":
            return X - self._shift
        buffer = self._buffer(self._centre_buffers, part, X.dtype, _BLOCK_ELEMENTS)
        return torch.sub(X, self._shift, out=buffer[: X.shape[0]])

    def result(self) -> NCMetrics:
        """The metrics, after both passes."""
        if self._pass != 2:
            raise ValueError("result needs two passes: call end_first_pass and feed the batches again")
        self._faults.raise_first(self.C)
        if not torch.equal(self._counts2, self._counts):
            raise ValueError(
                f"the second pass saw different data than the first ({self._n_pass2} vs {self.n} examples,"
                " or different class counts): feed the same batches twice"
            )
        C, p, M = self.C, self.p, self._M
        W = None if self._W is None else np.ldexp(self._W, -self._e_W)  # scaled like M (end_first_pass)
        sv_m = self._sv_means
        fields: dict[str, Any] = dict(
            n=self.n,
            p=p,
            C=C,
            nc1=float(self._nc1_sum) / self.n,
            etf_distance=_frame_distances(self._coords, p, ["simplex_etf"])[0],
            sv_means=tuple(map(float, np.ldexp(sv_m, self._e))),
            rank_means=self._r,
            stable_rank_means=float((sv_m**2).sum() / sv_m[0] ** 2),
            rho=self._rho,
        )
        fields.update(zip(("nc2_equinorm", "nc2_equiangle", "nc2_maxangle"), _nc2("centred class means", M)))
        if W is not None:
            fields.update(_classifier_fields(W, M))
            fields["sv_w"] = tuple(map(float, np.ldexp(fields["sv_w"], self._e_W)))
        if W is not None or self._outputs_given:
            fields["nc4"] = int(self._disagree) / self.n
            eps = 1.0 - float(self._correct.mean)
            fields.update(
                eps=eps,
                sqi_spread=self._wrong.rms_about(eps / (C - 1)),
                sqi_correct_std=float(np.sqrt(float(self._correct.m2) / self._correct.count)),
            )
        return NCMetrics(**fields)


def _row_blocks(X: torch.Tensor, dtype: torch.dtype) -> Iterable[slice]:
    """Row blocks of X small enough to stay in cache; one block when X is already in ``dtype`` on the
    CPU, or on a GPU (whose memory bandwidth makes a whole-batch cast cheap)."""
    if X.dtype == dtype or X.device.type != "cpu":
        return (slice(None),)
    return _row_chunks(X.shape[0], X.shape[1], _CAST_BLOCK_ELEMENTS)


def _output_moments(out_t: torch.Tensor, y: torch.Tensor) -> tuple[_BatchMoments, _BatchMoments]:
    """The correct-class and wrong-class moments of outputs out_t (C, b), one column per example."""
    # No boolean mask (its size would be read back from a GPU): the deviations of the correct-class
    # slots are set to zero, where they add exactly nothing.
    C, b = out_t.shape
    idx = y[None, :]
    correct = out_t.gather(0, idx)  # (1, b)
    total = correct.sum()
    return (
        _BatchMoments.of(b, total, lambda m: _sum_squares(correct - m)),
        _BatchMoments.of(
            b * (C - 1), out_t.sum() - total, lambda m: _sum_squares((out_t - m).scatter_(0, idx, 0.0))
        ),
    )


def _first_argmax(T: torch.Tensor) -> torch.Tensor:
    """For each column of T (k, b), the index of its first largest entry (``T.argmax(dim=0)``, ties
    included). From the column maxima, which torch reduces across rows several times faster than
    argmax or max with indices (measured at (100, 4096): 1.0 against 1.4-2.2 ms)."""
    k = T.shape[0]
    top = T.amax(dim=0, keepdim=True)  # (1, b)
    countdown = torch.arange(k, 0, -1, dtype=torch.int32, device=T.device)[:, None]  # (k, 1): k .. 1
    return k - ((T == top) * countdown).amax(dim=0)


def _sum_squares(t: torch.Tensor) -> torch.Tensor:
    """0-d sum of t**2 over all entries, in one reduction with no temporary."""
    return torch.linalg.vector_norm(t) ** 2


def _row_sum_squares(t: torch.Tensor) -> torch.Tensor:
    """(k,) sums of squares of the rows of t (k, b)."""
    return torch.linalg.vector_norm(t, dim=1) ** 2


def _non_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: whether t has a NaN or an inf. NaN and inf reach the extremes, and one reduction with no
    temporary reads t faster than ``isfinite(t).all()`` (measured: 0.07 against 0.6 ms for 300k entries)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _row_coordinates(V: np.ndarray) -> np.ndarray:
    """V (C, p) in an orthonormal basis of its row space when C < p: R^T (C, C) of the QR factorization
    V^T = Q R, since V = R^T Q^T with Q (p, C) orthonormal; V itself when C >= p. The singular values,
    the row norms and Gram, and so every frame distance, are V's own (Householder QR is backward
    stable, so they are as accurate as from V), and the C x C problems stay C x C. The classifier's
    singular values and its two frame distances this way, against the left singular vectors of R^T
    and an explicit frame as before (one thread, best of 10 and of 3, 2026-12-04, AMD EPYC VM):
    14.8 against 16.6 ms at (C, p) = (100, 2048), 0.98 against 1.62 s at (1000, 2048)."""
    return V if V.shape[0] >= V.shape[1] else np.linalg.qr(V.T, mode="r").T


def _classifier_fields(W: np.ndarray, M: np.ndarray) -> dict[str, Any]:
    """NC2 of the rows of W (C, p), its frame distances, NC3 against the centred means M (C, p), and
    W's singular values and ranks."""
    p = W.shape[1]
    fields: dict[str, Any] = dict(zip(("nc2_equinorm_w", "nc2_equiangle_w", "nc2_maxangle_w"), _nc2("W", W)))
    coords = _row_coordinates(W)  # (C, min(C, p))
    sv_w = np.linalg.svd(coords, compute_uv=False)
    frames = _frame_distances(coords, p, ["simplex_etf", "orthogonal_frame"])
    fields.update(etf_distance_w=frames[0], orth_distance_w=frames[1])
    fields["nc3"] = float(np.sum((W / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2))
    fields.update(
        sv_w=tuple(map(float, sv_w)),
        rank_w=_rank(sv_w, W.shape),
        stable_rank_w=float((sv_w**2).sum() / sv_w[0] ** 2) if sv_w[0] > 0 else 0.0,
    )
    return fields


def nc_metrics_from_moments(
    means: Any,
    scatter: Any,
    counts: Sequence[int],
    W: Any = None,
    b: Any = None,
    *,
    layers: Sequence[Any] | None = None,
    factor: Any = None,
) -> NCMetrics:
    """The measures of :func:`nc_metrics` that the class means and the within-class scatter determine.

    NC1 = Tr(Sigma_W Sigma_B^+)/C = (1/n) sum_k u_k^T S u_k / s_k^2 with M - mu_G = U diag(s) V^T
    (docs/theory.md §17.1, the same rank cutoff); NC2, NC3 and the ranks as :func:`nc_metrics`.
    ``eps`` is 1 - mean correct-class output of W h + b, which the means determine. NC4 and the SQI
    residuals need individual examples (or each class's own scatter) and are None here
    (docs/theory.md §11).

    Parameters
    ----------
    means : (p, C) class means mu_c as columns
    scatter : (p, p) S = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T
    counts : the C class counts N_c
    W : (C, p) classifier, optional
    b : (C,) bias, optional
    layers : weight matrices for rho, optional
    factor : (p, r) L with L L^T = scatter, optional: NC1 is then sum_k ||L^T u_k||^2 / s_k^2 / n,
        non-negative in floating point (u_k^T S u_k can round below zero where NC1 ~ 0)
    """
    mu = _numpy("means", means)
    S = _numpy("scatter", scatter)
    p, C = mu.shape
    check_classes(C)
    check_shape("scatter", S, (p, p))
    N = np.asarray(counts, dtype=float)
    check_shape("counts", N, (C,))
    if np.any(N < 1):
        raise ValueError(f"classes with no examples: {np.flatnonzero(N < 1)[:10].tolist()}")
    n = float(N.sum())
    mu_G = mu @ N / n  # (p,)
    M = (mu - mu_G[:, None]).T  # (C, p) centred means, as rows
    A, s, Vt = np.linalg.svd(M, full_matrices=False)
    scale = np.abs(mu).max()
    if s[0] <= _RANK_RTOL_FACTOR * max(M.shape) * np.finfo(float).eps * scale:
        raise ValueError("all class means are equal (to rounding): the between-class covariance is zero")
    r = min(C - 1, _rank(s, M.shape))
    U = Vt[:r].T  # (p, r)
    if factor is None:
        nc1 = float(np.sum((U * (S @ U)).sum(axis=0) / s[:r] ** 2) / n)
    else:
        LtU = check_shape("factor", _numpy("factor", factor), (p, None)).T @ U  # (r_L, r)
        nc1 = float(np.sum((LtU**2).sum(axis=0) / s[:r] ** 2) / n)
    fields: dict[str, Any] = dict(
        n=int(n), p=p, C=C, nc1=nc1,
        etf_distance=_frame_distances(A * s, p, ["simplex_etf"])[0],
        sv_means=tuple(map(float, s)), rank_means=r,
        stable_rank_means=float((s**2).sum() / s[0] ** 2),
    )  # fmt: skip
    fields.update(zip(("nc2_equinorm", "nc2_equiangle", "nc2_maxangle"), _nc2("centred class means", M)))
    if layers is not None:
        fields["rho"] = float(
            np.prod([np.linalg.norm(_numpy(f"layers[{k}]", L)) for k, L in enumerate(layers)])
        )
    if W is not None:
        Wn = _numpy("W", W)
        check_shape("W", Wn, (C, p))
        fields.update(_classifier_fields(Wn, M))
        F = Wn @ mu + (0 if b is None else check_shape("b", _numpy("b", b), (C,))[:, None])  # (C, C)
        fields["eps"] = 1.0 - float(np.diagonal(F) @ N) / n
    return NCMetrics(**fields)


def _rows_per(p: int, elements: int) -> int:
    """Rows of p entries in a chunk of about ``elements`` entries (one at least)."""
    return max(1, elements // max(p, 1))


def _row_chunks(n: int, p: int, elements: int = _CHUNK_ELEMENTS) -> Iterable[slice]:
    step = _rows_per(p, elements)
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def nc_metrics(
    features: Any,
    labels: Any,
    W: Any = None,
    b: Any = None,
    *,
    outputs: Any = None,
    layers: Sequence[Any] | None = None,
    C: int | None = None,
) -> NCMetrics:
    """Neural-collapse measurements NC1-NC4 of features, with optional classifier and outputs.

    Parameters
    ----------
    features : (n, p) array or tensor, one example per row (any torch device; computed there).
    labels : (n,) integers 0..C-1; every class needs at least one example, C >= 2.
    W : (C, p) classifier with rows W^c, optional; b : (C,) bias, optional (needs W).
    outputs : (n, C) network outputs, optional. Used for eps and the SQI spread (instead of W h + b),
        and for NC4 when W is absent.
    layers : weight matrices W_1..W_L, optional, for rho = prod_k ||W_k||_F.
    C : number of classes (default: W.shape[0], else max(labels) + 1).

    Returns
    -------
    NCMetrics
        Fields needing W, outputs or layers are None without them. ETF distances are None when
        p < C-1 and the orthogonal-frame distance when p < C (the frames do not exist there);
        nc2_* are still defined. A zero centred mean or zero row of W raises ValueError, since its
        cosines are undefined.

    Notes
    -----
    Definitions (Papyan, Han and Donoho 2020, with the statistics of docs/theory.md §0.3), for n_c examples of class c:

    * mu_c = class mean; mu_G = 1/n sum_i h_i, the mean over **all examples** (so each class is
      weighted by n_c/n when the classes are unbalanced); M_c = mu_c - mu_G.
    * Sigma_W = 1/n sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (every example weighted equally);
      Sigma_B = 1/C sum_c M_c M_c^T (every class weighted equally, unweighted by n_c).
    * NC1 = Tr(Sigma_W Sigma_B^+) / C, computed in span(M) without any p x p matrix (module docstring).
      The rank of M is r = min(C-1, #{s_k > max(C, p) eps s_max}).
    * NC2 on the M_c (and on the rows W^c for the ``_w`` variants): equinorm = std_c ||M_c|| /
      mean_c ||M_c||; equiangle = std over c != c' of cos(M_c, M_c'); maxangle = mean over c != c'
      of |cos + 1/(C-1)|. Every class counts once regardless of n_c.
    * NC3 = || W/||W||_F - M/||M||_F ||_F^2 with M as rows (C, p), i.e. docs/theory.md §17.4's
      || W^T/||W||_F - M/||M||_F ||_F^2.
    * NC4 = 1/n #{i : argmax_c (W h_i + b)_c != argmin_c ||h_i - mu_c||}; the bias is included.
    * SQI (docs/theory.md §17.6) with f the outputs (given, else W h + b): eps = 1 - 1/n sum_i f_{y_i}(x_i);
      sqi_spread = sqrt(1/(n(C-1)) sum_i sum_{c != y_i} (f_c(x_i) - eps/(C-1))^2);
      sqi_correct_std = std_i f_{y_i}(x_i).
    * Singular values, numerical rank (cutoff max(rows, cols) eps s_max) and stable rank
      ||A||_F^2 / ||A||_2^2 of M and of W.

    Cost O(n p C): one pass of class sums and one matmul of the features with a (p, r + C) matrix,
    in chunks (:class:`NCAccumulator`); the features are never copied (the range of docs/theory.md
    §17.8 is handled on the class means).

    Accuracy (docs/theory.md §17.9). Float64 features: rounding of float64 (about 1e-13 relative).
    Float32 (or half-precision) features are measured with float32 products and float64 sums: the
    class means, NC2, NC3, singular values and ranks are as accurate as from float64; NC1 is within
    2 c kappa + (c kappa)^2 relative, c = (p + 2) 2^-24, kappa^2 = (1/n sum_i ||h_i - m||^2) Tr(S^-2) / NC1
    with m = mu_G and S the singular values of M; the outputs W h + b within c ||W_c|| ||h_i - m||. That
    is the result for features perturbed by (p + 2) 2^-24 ||h_i - m|| per example. Measured errors
    are far below these bounds (on ``benchmarks/bench_metrics.py``'s data every measure is within 1e-5
    relative of float64 on the same values); NC4 can change only for examples within that margin of a tie.
    """
    X = features if isinstance(features, torch.Tensor) else np.asarray(features)
    if X.ndim != 2:
        raise ValueError(f"features must be a (n, p) matrix of rows, got shape {tuple(X.shape)}")
    n, p = X.shape
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if W is not None:
        W = _numpy("W", W)
        if W.ndim == 2 and W.shape[1] != p:
            transposed = f"; it looks transposed: pass W.T, shape {W.shape[::-1]}" if W.shape[0] == p else ""
            raise ValueError(
                f"W must be (C, p) with p = {p} columns like the features, got {W.shape}{transposed}"
            )
        C = W.shape[0] if C is None and W.ndim == 2 else C
    y, C = check_labels(y, n, C)
    if outputs is not None:
        check_shape("outputs", outputs if isinstance(outputs, torch.Tensor) else np.asarray(outputs), (n, C))
    # Scale invariance (docs/theory.md §17.8) is the accumulator's: it rescales the class means, not
    # the features, so no pass or copy of the features is spent on it.
    acc = NCAccumulator(C, W=W, b=b, layers=layers)
    if W is not None and acc.p != p:
        raise ValueError(f"W must be (C, p) = ({C}, {p}) to match the features, got {tuple(W.shape)}")
    return _two_passes(
        acc,
        lambda: (
            (X[r], y[r], None if outputs is None else outputs[r])
            for r in _row_chunks(n, p, _PASS1_CHUNK_ELEMENTS if acc.pass_number == 1 else _CHUNK_ELEMENTS)
        ),
    )


def _binary_exponent(a: np.ndarray) -> int:
    """e with max |a| in [2^(e-1), 2^e) (``np.frexp``), clamped to [-1022, 1023] so that 2^e and 2^-e
    are finite; 0 for an empty, zero or non-finite a."""
    top = float(np.max(np.abs(a))) if a.size else 0.0
    return min(max(int(np.frexp(top)[1]), -1022), 1023) if math.isfinite(top) and top > 0 else 0


def _pow2(e: int) -> float:
    """2^e as a float (exact for -1074 <= e <= 1023)."""
    return math.ldexp(1.0, e)


def _two_passes(acc: NCAccumulator, batches: Callable[[], Iterable[tuple]] | Iterable[tuple]) -> NCMetrics:
    """Feed the same batches to ``acc`` twice (class means, then the projected statistics)."""
    check_reiterable("batches", batches)
    for _ in range(2):
        for batch in batches() if callable(batches) else batches:
            acc.update(*batch)
        if acc.pass_number == 1:
            acc.end_first_pass()
    return acc.result()


def nc_metrics_stream(
    batches: Callable[[], Iterable[tuple]] | Iterable[tuple],
    C: int | None = None,
    *,
    W: Any = None,
    b: Any = None,
    layers: Sequence[Any] | None = None,
) -> NCMetrics:
    """:func:`nc_metrics` over a stream of ``(features, labels[, outputs])`` batches, in two passes.

    ``batches`` is a re-iterable (a list, a DataLoader without shuffling... any split works, but both
    passes must see the same examples) or a zero-argument callable returning a fresh iterable.
    """
    return _two_passes(NCAccumulator(C, W=W, b=b, layers=layers), batches)


FILE_KEYS = ("features", "labels")
OPTIONAL_FILE_KEYS = ("weight", "bias", "outputs")


def load_features(path: str) -> dict[str, Any]:
    """Read ``features``, ``labels`` and optional ``weight``, ``bias``, ``outputs`` from a file.

    ``path`` is a NumPy ``.npz`` or a torch ``.pt``/``.pth`` file holding a dict of arrays or tensors
    (read with ``weights_only=True``: no code is executed). Raises ValueError naming the file when it
    cannot be read or lacks a required key.
    """
    suffix = str(path).rsplit(".", 1)[-1].lower()
    if suffix not in ("npz", "pt", "pth"):
        raise ValueError(f"{path}: unknown file type; expected .npz or .pt")
    if suffix == "npz" and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # np.load reads a file that is not a zip archive as a pickle, and then reports "pickled data".
        raise ValueError(
            f"{path} is not a NumPy .npz archive (not a zip file); write one with "
            "np.savez(path, features=..., labels=...)"
        )
    try:
        if suffix == "npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only's refusal; torch's text says to turn it off
        held = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = "it is not a file written by torch.save"
        if held:
            name = held.group(1)
            what = f"it holds NumPy arrays ({name})" if name.startswith("numpy") else f"it holds a {name}"
        raise ValueError(
            f"cannot read {path}: {what}, and .pt files are read with weights_only=True (tensors and plain "
            "containers only, so no code runs): save tensors, torch.save({'features': torch.as_tensor(H), "
            "'labels': ...}, path), or NumPy arrays with np.savez(path, features=..., labels=...)"
        ) from None
    except Exception as err:  # corrupt archives raise zipfile, pickle or runtime errors alike
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a dict of arrays, got {type(data).__name__}")
    missing = [k for k in FILE_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}; it holds {sorted(map(str, data))}")
    return {k: data[k] for k in FILE_KEYS + OPTIONAL_FILE_KEYS if k in data}
