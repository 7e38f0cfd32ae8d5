"""Integrators of the flow as objects, in the manner of SciPy's ``OdeSolver`` (docs/theory.md §13.3).

Every integrator integrates y' = F(y) = Lambda y + R(y) from t = 0 to ``t_bound``, where Lambda is the
diagonal linear part of the exact split (docs/theory.md §13.1). The contract, shared by all:

* ``Integrator(fun, y0, t_bound, rtol=, atol=, linear=, device=, first_step=, max_step=,
  overwrite_y0=)`` with ``fun(y) -> (loss, F(y), stationarity)`` an :class:`Evaluator`; rtol and atol
  are floats or arrays of one tolerance per entry of y; ``linear`` is Lambda, a :class:`Diagonal` (or
  its vector); ``overwrite_y0`` lets the method reuse y0's memory once it has stepped past it (the
  driver's own start state; else y0 is only read);
* ``step()`` takes one accepted step and returns None, or a message when the method failed;
* ``t``, ``t_old``, ``y``: the state after the last accepted step; ``host(a)`` reads an array back;
* ``dense(keep=True)``: a ``scipy.integrate.DenseOutput`` over the last step [t_old, t], on the host;
  ``keep=False`` promises that the caller drops it before the next step (a record's interpolation),
  so the method may go on reusing the arrays it holds;
* class attributes ``order`` (the stated order; a (lowest, highest) pair for variable-order methods)
  and ``default_tolerances(tol)``, the library's numerical policy for that method.

The driver (``ufm.dynamics.flow``) owns everything else, written once: recording at requested times,
dense output over the whole run, the stationarity and target stopping rules, budgets, divergence.

``METHODS`` is the registry; ``DEFAULT_METHOD`` is the library's one default (``ufm flow``, sweeps and
``ufm reproduce`` use it too), chosen by measurement (docs/theory.md §13.6).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import integrate, sparse
from scipy.integrate import DenseOutput

from .._blocks import BLOCK, add_scaled, block_slices
from .._validation import check_torch_device

__all__ = [
    "ACCURATE_METHOD", "ACCURATE_RTOL", "DEFAULT_METHOD", "Diagonal", "ETD2", "Evaluator", "FlowDiverged", "Integrator", "METHODS", "ScipyIntegrator",
    "StepController", "default_method", "etd2_step",
]  # fmt: skip

# LSODA takes only a dense Jacobian: 4000 parameters is a 128 MB matrix, beyond that refuse.
DENSE_JAC_MAX = 4000
# Below |z| = 0.02 phi_2's closed form loses digits to cancellation (2 eps/|z| relative); the Taylor
# series to z^6 is exact there to rounding (next terms 0.02^7/8! = 3e-17 and 0.02^7/9! = 4e-18).
_PHI_SERIES = 0.02
# A step shorter than this fraction of t is rounding noise: the integration is stuck.
_MIN_REL_STEP = 1e-13
_TINY = 1e-300
# Arrays an Evaluator keeps for reuse: ETD2 hands back two per step (F at the last state, and the
# remainder R(u) - R(y) of its trial) and takes two (F at the trial stage, F at the accepted state).
_MAX_SPARE = 2


@dataclass(frozen=True)
class Diagonal:
    """A diagonal matrix that is constant on runs of consecutive entries, ``levels[k]`` on the entries
    ``runs[k]``: the form of Lambda, constant on each parameter block (docs/theory.md §13.1). It is kept
    as its runs, not as a vector of the state's size (one state less in memory, §13.3);
    ``np.asarray(diagonal)`` gives the vector."""

    runs: tuple[slice, ...]
    levels: np.ndarray  # (len(runs),)

    @classmethod
    def of(cls, parts: Iterable[tuple[int, float]]) -> Diagonal:
        """From (size, value) pairs in the state's order; neighbours of equal value share one run."""
        runs: list[slice] = []
        levels: list[float] = []
        stop = 0
        for size, value in parts:
            if size == 0:
                continue
            if levels and levels[-1] == value:
                runs[-1] = slice(runs[-1].start, stop + size)
            else:
                runs.append(slice(stop, stop + size))
                levels.append(float(value))
            stop += size
        return cls(tuple(runs), np.array(levels))

    @classmethod
    def coerce(cls, linear: Diagonal | np.ndarray) -> Diagonal:
        """``linear`` itself, or the runs of a diagonal given as its vector."""
        if isinstance(linear, Diagonal):
            return linear
        vector = np.asarray(linear, dtype=float).ravel()
        cuts = [0, *(np.flatnonzero(np.diff(vector)) + 1).tolist(), vector.size]
        return cls.of((j - i, vector[i]) for i, j in zip(cuts[:-1], cuts[1:]))

    @property
    def size(self) -> int:
        return self.runs[-1].stop if self.runs else 0

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:  # NumPy 2's protocol: there is no vector to share without making one
            raise ValueError("a Diagonal holds runs, not a vector: np.asarray(diagonal) makes the vector")
        vector = np.empty(self.size, dtype=float if dtype is None else dtype)
        for run, level in zip(self.runs, self.levels):
            vector[run] = level
        return vector


class FlowDiverged(ArithmeticError):
    """The vector field overflowed or turned NaN; carries the cause and the last good time."""

    def __init__(self, cause: str, t_good: float):
        super().__init__(f"diverged: {cause}; last good time t = {t_good:.6g}")
        self.cause, self.t_good = cause, t_good


class Evaluator:
    """``fun(y) -> (loss, F(y), stationarity)`` that counts evaluations and reuses the last one.

    A method that evaluates F at the point it then accepts (first-same-as-last Runge-Kutta, ETD2) gets
    the driver's check of that point for free. With ``by_value`` the cache compares a copy of the
    state (SciPy's BDF updates its Newton iterate in place after evaluating it); otherwise identity.
    A non-finite loss or stationarity (the norm of the gradient, so any bad entry shows in it) raises
    FlowDiverged with the last good time ``t_good``, which the driver keeps current.

    ``into(y, out)`` (optional) is the field writing F(y) into ``out``: arrays an integrator is done
    with and hands back by ``recycle`` are then filled by the next evaluations instead of fresh ones
    (docs/theory.md §13.3).
    """

    def __init__(
        self,
        field: Callable[[Any], tuple[Any, Any, Any]],
        *,
        by_value: bool = False,
        into: Callable[[Any, Any], tuple[Any, Any, Any]] | None = None,
    ):
        self.field, self.by_value, self.into = field, by_value, into
        self.nfev, self.t_good = 0, 0.0
        self._key: Any = None
        self._out: tuple[float, Any, float] | None = None
        self._spare: list[Any] = []

    def __call__(self, y: Any) -> tuple[float, Any, float]:
        if self._out is not None and (np.array_equal(self._key, y) if self.by_value else (y is self._key)):
            return self._out
        self.release()  # the last point's arrays are not kept alive through the new evaluation
        try:
            if self.into is not None and self._spare:
                value, dy, stat = self.into(y, self._spare.pop())
            else:
                value, dy, stat = self.field(y)
        except FloatingPointError as err:
            raise FlowDiverged(f"floating-point {err}", self.t_good) from None
        value, stat = float(value), float(stat)
        self.nfev += 1
        if not (np.isfinite(value) and np.isfinite(stat)):
            raise FlowDiverged(f"non-finite loss {value:.3g} or gradient norm {stat:.3g}", self.t_good)
        self._key = np.array(y, copy=True) if self.by_value else y
        self._out = (value, dy, stat)
        return self._out

    def release(self) -> None:
        """Forget the cached point: its arrays then belong to the caller alone, which may overwrite
        them (ETD2 reuses a trial stage's field as scratch once it has read it)."""
        self._key = self._out = None

    def recycle(self, a: Any) -> None:
        """Take back a state-sized array that nobody reads any more, to be overwritten by a later
        evaluation (kept only with ``into``, and at most ``_MAX_SPARE`` of them)."""
        if self.into is not None and len(self._spare) < _MAX_SPARE:
            self._spare.append(a)


class Integrator(ABC):
    """One method of the registry (module docstring for the contract)."""

    name: ClassVar[str]
    order: ClassVar[int | tuple[int, int]]
    # Whether the method can run its state on a torch device (others run NumPy on the host).
    on_device: ClassVar[bool] = False
    # Whether the Evaluator must compare states by value (module docstring of Evaluator).
    cache_by_value: ClassVar[bool] = False

    t: float
    t_old: float | None

    @abstractmethod
    def __init__(
        self, fun: Evaluator, y0: np.ndarray, t_bound: float, *, rtol: float, atol: float,
        linear: Diagonal | np.ndarray, device: str = "cpu", first_step: float | None = None,
        max_step: float = np.inf, overwrite_y0: bool = False,
    ): ...  # fmt: skip

    @property
    @abstractmethod
    def y(self) -> Any: ...

    @abstractmethod
    def step(self) -> str | None:
        """Take one accepted step; None on success, else why the method failed."""

    @abstractmethod
    def dense(self, keep: bool = True) -> DenseOutput:
        """Interpolant of the state (host arrays) over the last step [t_old, t] (``keep``: module
        docstring)."""

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(a, dtype=float)

    @classmethod
    @abstractmethod
    def default_tolerances(cls, tol: float) -> tuple[float, float]:
        """(rtol, atol) when the caller gives none, for a run that stops at ||grad L|| < tol."""

    @classmethod
    def check_device(cls, device: str) -> None:
        if device == "cpu":
            return
        check_torch_device(device)
        if not cls.on_device:
            raise ValueError(f"{cls.name} runs on the host; use device='cpu', or ETD2 on {device!r}")


# ---------------------------------------------------------------------------------------------------
# SciPy's solve_ivp methods, stepped one accepted step at a time.


class ScipyIntegrator(Integrator):
    """A ``scipy.integrate`` OdeSolver behind the common contract.

    Implicit methods get the diagonal linear part -Lambda as an approximate Jacobian: a full one (the
    negative Hessian, 1.3M x 1.3M at (C, N, p) = (100, 50, 256)) is out of reach; the approximation only
    steers their Newton iterations, while the accuracy is still set by their error estimates.
    """

    solver_class: ClassVar[type]
    jacobian: ClassVar[str | None] = None  # None (explicit), "sparse" or "dense"
    # BDF and Radau derive their Newton tolerance from a scalar rtol; per-entry rtols are set after.
    scalar_rtol: ClassVar[bool] = False

    def __init__(
        self, fun: Evaluator, y0: np.ndarray, t_bound: float, *, rtol: float, atol: float,
        linear: Diagonal | np.ndarray, device: str = "cpu", first_step: float | None = None,
        max_step: float = np.inf, overwrite_y0: bool = False,
    ):  # fmt: skip
        self.check_device(device)  # overwrite_y0 changes nothing: SciPy's solvers copy y0
        kw: dict[str, Any] = {}
        if self.jacobian == "dense":
            if y0.size > DENSE_JAC_MAX:
                raise ValueError(
                    f"{self.name} needs a dense Jacobian; {y0.size} parameters exceed DENSE_JAC_MAX = "
                    f"{DENSE_JAC_MAX}: use BDF or Radau (sparse approximate Jacobian), DOP853 or ETD2"
                )
            dense_jac = np.diag(np.asarray(linear))
            kw["jac"] = lambda t, y: dense_jac
        elif self.jacobian == "sparse":
            kw["jac"] = sparse.diags(np.asarray(linear), format="csc")
        if first_step is not None:
            kw["first_step"] = first_step
        per_entry = self.scalar_rtol and np.ndim(rtol) > 0
        self._solver = self.solver_class(
            lambda t, y: fun(y)[1], 0.0, y0, t_bound, rtol=np.min(rtol) if per_entry else rtol, atol=atol,
            max_step=max_step, **kw,
        )  # fmt: skip
        if per_entry:
            self._solver.rtol = np.asarray(rtol, dtype=float)

    @property
    def t(self) -> float:
        return float(self._solver.t)

    @property
    def t_old(self) -> float | None:
        return None if self._solver.t_old is None else float(self._solver.t_old)

    @property
    def y(self) -> np.ndarray:
        return self._solver.y

    def step(self) -> str | None:
        message = self._solver.step()
        return f"{self.name} failed: {message}" if self._solver.status == "failed" else None

    def dense(self, keep: bool = True) -> DenseOutput:
        return self._solver.dense_output()  # SciPy's own arrays: keep changes nothing

    @classmethod
    def default_tolerances(cls, tol: float) -> tuple[float, float]:
        # At a loose tolerance these methods hover at their stability limit with errors of the size of
        # the tolerance, which floors ||grad L||: stay 1e4 below the stationarity threshold.
        rtol = min(1e-8, tol * 1e-4)
        return rtol, rtol * 1e-2


def _scipy_method(name: str, order: int | tuple[int, int], jacobian: str | None = None, **extra):
    """A ScipyIntegrator subclass for ``scipy.integrate.<name>``."""
    attrs = dict(name=name, order=order, jacobian=jacobian, solver_class=getattr(integrate, name), **extra)
    return type(name, (ScipyIntegrator,), attrs)


# ---------------------------------------------------------------------------------------------------
# ETD2: an exponential integrator, split into the step and its step-size controller.


def _phi12(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi_1(z) = (e^z - 1)/z and phi_2(z) = (e^z - 1 - z)/z^2 elementwise, by series near 0.

    z holds one entry per run of Lambda (a handful), so it is walked in Python floats: 5.0 us a call
    against 48 us for the formulas as NumPy expressions, on four entries (once every ETD2 trial step;
    best of 20,000 calls, 2026-12-04)."""
    phi1, phi2 = [], []
    for x in z.tolist():
        if abs(x) < _PHI_SERIES:  # sum_k x^k/(k+1)! and sum_k x^k/(k+2)!, k <= 6, by Horner
            phi1.append(
                1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x / 5040)))))
            )
            phi2.append(
                1 / 2
                + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320)))))
            )
        else:
            em1 = math.expm1(x)
            phi1.append(em1 / x)
            phi2.append((em1 - x) / (x * x))
    return np.array(phi1), np.array(phi2)


@dataclass(frozen=True)
class ETD2Step:
    """One trial step of ETD2RK: the new state, the remainder's change R(u) - R(y) along the step (the
    error estimate y_new - u is h phi_2 times it, run by run), and the Lipschitz estimate
    rho = ||R(u) - R(y)|| / ||u - y|| of the remainder along the step."""

    y_new: Any
    remainder: Any
    rho: float
    err: float | None = None  # the scaled RMS of the correction y_new - u, when etd2_step was given ``error``


def etd2_step(
    fun: Evaluator, y: Any, f: Any, h: float, runs: list[slice], levels: np.ndarray, *, u: Any = None,
    block: int | None = BLOCK, error: Callable[..., float] | None = None, xp: Any = np,
) -> ETD2Step:  # fmt: skip
    """ETD2RK (Cox and Matthews 2002, eq. 22) for y' = Lambda y + R(y), Lambda diagonal by ``runs``.

    With u - y = h phi_1(h Lambda) f(y), the two stages read::

        u     = y + h phi_1 f(y)                                        (exponential Euler)
        y_new = u + h phi_2 (R(u) - R(y)),  R(u) - R(y) = f(u) - e^{h Lambda} f(y)     (ETD2RK),

    so the phi-functions are one scalar per run of Lambda. The correction y_new - u is the ETD1/ETD2
    difference, the error estimate. rho is free: both f values are at hand (Shampine's stiffness
    detection; Hairer and Wanner II, IV.2). Works on NumPy arrays and torch tensors alike (``xp``,
    the array module of y).

    Memory (docs/theory.md §13.3): two state-sized arrays, u and f(u). The stage u is written into
    ``u`` when given (a state-sized array the caller is done with), else into a new array; y_new is
    then written over u, and R(u) - R(y) over f(u), which the step owns once ``fun`` has released it.
    y and f are only read. The elementwise work runs over blocks of ``block`` entries of each run (the
    whole run if None, as on a device), so its scratch stays in cache: twelve operations an entry over
    the two passes, three of them dot products. Given ``error``, a function of (a, y, y_new, part=,
    work=) on a block that sums its squared scaled error (``StepController.scaled_sq``), the error
    norm is taken in the same pass (``ETD2Step.err``); ``work`` is two scratch arrays of the block's
    size.
    """
    phi1, phi2 = _phi12(h * levels)
    u = f + 0 if u is None else u
    sq_step = 0.0
    for run, c1 in zip(runs, h * phi1):
        for part in block_slices(run.start, run.stop, block):
            step = xp.multiply(f[part], c1, out=u[part])  # the step h phi_1 f
            sq_step += float(step @ step)
            step += y[part]
    _, fu, _ = fun(u)
    fun.release()  # fu is ours: it becomes R(u) - R(y)
    longest = max(run.stop - run.start for run in runs)
    work = [] if error is None else [xp.empty_like(y[: min(block or longest, longest)]) for _ in range(2)]
    sq_rest = sq_err = 0.0
    for run, c1, c2, lam in zip(runs, h * phi1, h * phi2, levels):
        for part in block_slices(run.start, run.stop, block):
            rest = fu[part]
            add_scaled(rest, -(1.0 + c1 * lam), f[part])  # e^{h lam} = 1 + h phi_1 lam
            sq_rest += float(rest @ rest)
            new = u[part]
            add_scaled(new, c2, rest)  # y_new = u + h phi_2 (R(u) - R(y)), over u
            if error is not None:
                size = part.stop - part.start
                sq_err += c2**2 * error(rest, y[part], new, part=part, work=[w[:size] for w in work])
    err = None if error is None else (sq_err / y.shape[0]) ** 0.5
    return ETD2Step(u, fu, (sq_rest / max(sq_step, _TINY)) ** 0.5, err)


@dataclass
class StepController:
    """Step-size control of an embedded pair (Hairer, Norsett and Wanner I, II.4), with a stability cap.

    ``error_exponent`` is 1/(q + 1) for an error estimate of order q (ETD2's ETD1/ETD2 difference:
    q = 1). ``stability`` caps h <= stability/rho, rho the remainder's Lipschitz estimate: ETD2RK's
    explicit part is Heun's method, stable for real h mu in [-2, 0]; without the cap a loose rtol lets
    steps hover at that limit, accepting errors of the size of the tolerance at every step, and
    ||grad L|| stalls (measured: 6e-5 at rtol 1e-3 on (C, N, p) = (3, 3, 4); 1e-11 with the cap).
    """

    rtol: Any  # a float, or one per entry of the state (an array, or a tensor on the state's device)
    atol: Any
    error_exponent: float = 0.5
    max_step: float = np.inf
    safety: float = 0.9
    grow_max: float = 5.0
    shrink_min: float = 0.2
    stability: float = 1.5

    def __post_init__(self) -> None:
        # Scalar tolerances with rtol > 0 take scaled_sq's shorter form (decided once: it runs on every
        # block of every trial).
        self._scalar = np.ndim(self.rtol) == 0 and np.ndim(self.atol) == 0 and self.rtol > 0

    def initial(self, y: Any, f: Any, xp: Any) -> float:
        """Hairer's starting step 0.01 ||y|| / ||f|| in the error norm (1e-6 near zero)."""
        d0, d1 = self._scaled_rms(y, y, y, xp), self._scaled_rms(f, y, y, xp)
        h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        return min(h, self.max_step)

    def error(self, correction: Any, y: Any, y_new: Any, xp: Any) -> float:
        """RMS of the error estimate scaled by atol + rtol max(|y|, |y_new|); <= 1 accepts.

        Computed over blocks of the (flat) state, so its temporaries are never copies of the state."""
        return self._scaled_rms(correction, y, y_new, xp)

    def _scaled_rms(self, a: Any, y: Any, y_new: Any, xp: Any) -> float:
        """RMS of a / (atol + rtol max(|y|, |y_new|)), block by block."""
        work = [xp.empty_like(a[:BLOCK]) for _ in range(2)]
        total = sum(
            self.scaled_sq(a[b], y[b], y_new[b], xp, part=b, work=[w[: b.stop - b.start] for w in work])
            for b in block_slices(0, a.shape[0])
        )  # fmt: skip
        return (total / a.shape[0]) ** 0.5

    def scaled_sq(
        self, a: Any, y: Any, y_new: Any, xp: Any = np, *, part: slice = slice(None), work: Any = None
    ) -> float:
        """Sum of (a / (atol + rtol max(|y|, |y_new|)))^2 over a block, in ``work``: two scratch arrays
        of its size (fresh ones if None).

        ``part`` is where the block sits in the state, for per-entry tolerances. With scalar ones
        (rtol > 0) the scale is rtol (max + atol/rtol), which saves an operation an entry."""
        q, spare = (xp.empty_like(a), xp.empty_like(a)) if work is None else work
        xp.abs(y, out=q)
        xp.maximum(q, xp.abs(y_new, out=spare), out=q)  # max(|y|, |y_new|)
        if self._scalar:
            q += self.atol / self.rtol
            xp.divide(a, q, out=q)
            return float(q @ q) / self.rtol**2
        atol, rtol = (tol if np.ndim(tol) == 0 else tol[part] for tol in (self.atol, self.rtol))
        q *= rtol
        q += atol
        xp.divide(a, q, out=q)
        return float(q @ q)

    def rejected(self, h: float, err: float) -> float:
        """The next trial step after a rejection (a non-finite trial shrinks by the most)."""
        return h * (self.shrink_min if not np.isfinite(err) else max(self.shrink_min, self._factor(err)))

    def accepted(self, h: float, err: float, rho: float) -> float:
        """The next step after an accepted one, capped by max_step and the stability limit."""
        h_next = h * min(self.grow_max, self._factor(max(err, 1e-10)))
        return min(h_next, self.max_step, self.stability / max(rho, _TINY))

    def _factor(self, err: float) -> float:
        return self.safety * err**-self.error_exponent


def _hermite(t0: float, y0: np.ndarray, f0: np.ndarray, t1: float, y1: np.ndarray, f1: np.ndarray, t: float):
    """Cubic Hermite interpolation between (t0, y0, y0') and (t1, y1, y1') at a time t (third order, as
    ETD2), in one new state-sized array: the terms are added into it in place."""
    h = t1 - t0
    s = (t - t0) / h
    h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
    out = y0 * h00
    for c, a in ((h10 * h, f0), (h01, y1), (h11 * h, f1)):
        add_scaled(out, c, a)
    return out


class _HermiteOutput(DenseOutput):
    """Dense output of one ETD2 step: cubic Hermite through both ends and their slopes."""

    def __init__(self, t_old: float, y_old: np.ndarray, f_old: np.ndarray, t: float, y, f):
        super().__init__(t_old, t)
        self.ends = (t_old, y_old, f_old, t, y, f)

    def _call_impl(self, t):
        t = np.asarray(t, dtype=float)
        if t.ndim == 0:
            return _hermite(*self.ends, float(t))
        return np.stack([_hermite(*self.ends, float(ti)) for ti in t.ravel()], axis=-1)  # (n, k)


class ETD2(Integrator):
    """Adaptive second-order exponential integrator, ETD2RK (Cox and Matthews 2002; Hochbruck and
    Ostermann, Acta Numerica 2010), in NumPy on the host or in torch float64 on any device.

    Lambda is treated exactly through exp(h Lambda) and the phi-functions, R explicitly; the split is
    exact, so ETD2 integrates the same flow and keeps every fixed point exactly (docs/theory.md §13.3).
    """

    name = "ETD2"
    order = 2
    on_device = True

    def __init__(
        self, fun: Evaluator, y0: np.ndarray, t_bound: float, *, rtol: float, atol: float,
        linear: Diagonal | np.ndarray, device: str = "cpu", first_step: float | None = None,
        max_step: float = np.inf, overwrite_y0: bool = False,
    ):  # fmt: skip
        self.fun, self.t_bound = fun, float(t_bound)
        diagonal = Diagonal.coerce(linear)
        self.runs, self.levels = list(diagonal.runs), diagonal.levels
        if device == "cpu":  # NumPy on the host: no tensor round trips around the analytic gradient
            self.xp, self._y = np, y0  # written to only with overwrite_y0
        else:
            import torch

            self.xp = torch
            self._y = torch.as_tensor(y0, dtype=torch.float64, device=torch.device(device)).clone()
        if self.xp is not np:  # per-entry tolerances live where the state does
            rtol, atol = (
                tol if np.ndim(tol) == 0 else self.xp.as_tensor(tol, device=self._y.device)
                for tol in (rtol, atol)
            )
        self.control = StepController(rtol, atol, max_step=max_step)
        self._error_sq = functools.partial(self.control.scaled_sq, xp=self.xp)
        self.h = first_step
        self.t, self.t_old = 0.0, None
        self._old: tuple[Any, Any, bool] | None = None  # (y, f, whether to reuse them) at t_old
        # Whether self._y (and F there) may be reused once stale: not y0 unless the caller gives it up
        # (a device copy is ETD2's own), and not an array lent to an interpolant (dense).
        self._owned = overwrite_y0 or self.xp is not np
        self._scratch: Any = None  # a state-sized array to write the next trial stage into
        self._block = BLOCK if device == "cpu" else None  # on a device, whole runs: fewer kernels

    @property
    def y(self) -> Any:
        return self._y

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(a, dtype=float) if self.xp is np else a.detach().cpu().numpy()

    def step(self) -> str | None:
        y, t = self._y, self.t
        if self._old is not None:  # the last step's interpolant is not needed any more: reuse its arrays
            if self._old[2]:
                self._scratch = self._old[0]  # the next trial stage
                self.fun.recycle(self._old[1])
            self._old = None
        f = self.fun(y)[1]  # the driver's check of this point: a cache hit
        h = self.control.initial(y, f, self.xp) if self.h is None else self.h
        while True:
            h = min(h, self.t_bound - t)
            trial = None
            try:
                trial = etd2_step(
                    self.fun, y, f, h, self.runs, self.levels, u=self._scratch, block=self._block,
                    error=self._error_sq, xp=self.xp,
                )  # fmt: skip
                err = trial.err
            except FlowDiverged:  # a non-finite trial stage is a failed step: shrink and retry
                err = float("inf")
            if np.isfinite(err) and err <= 1.0:
                break
            if trial is not None:  # a rejected trial's two arrays are reused by the next one
                self._scratch = trial.y_new
                self.fun.recycle(trial.remainder)
            h = self.control.rejected(h, err)
            if h < _MIN_REL_STEP * max(t, 1.0):
                return f"step size underflow (h = {h:.3g}) in ETD2 at t = {t:.6g}"
        self._old = (y, f, self._owned)
        self.t_old = t
        self.t = self.t_bound if t + h >= self.t_bound * (1 - 1e-15) else t + h
        self._y, self._owned, self._scratch = trial.y_new, True, None
        self.fun.recycle(trial.remainder)  # for the driver's check of y_new
        self.h = self.control.accepted(h, err, trial.rho)
        return None

    def dense(self, keep: bool = True) -> DenseOutput:
        """The interpolant holds the step's four arrays; kept (``keep``), they are never reused by later
        steps."""
        y_old, f_old, _ = self._old
        f = self.fun(self._y)[1]
        if keep:
            self._old, self._owned = (y_old, f_old, False), False
        ends = [self.host(a) for a in (y_old, f_old, self._y, f)]
        return _HermiteOutput(self.t_old, ends[0], ends[1], self.t, ends[2], ends[3])

    @classmethod
    def default_tolerances(cls, tol: float) -> tuple[float, float]:
        # The step cap makes ETD2 end at the fixed point at any rtol, so rtol sets only the accuracy of
        # the path: at 1e-5 the loss along it stays within ~4e-7 (relative) of BDF at rtol 1e-10, at
        # (C, N, p) = (10, 100, 64), lam = 5e-4 (docs/theory.md §13.4).
        return 1e-5, 1e-7


# Integrators by name. RK23's error estimate is second order but it propagates the third-order
# solution; BDF and LSODA change their order as they go (BDF 1-5, LSODA's stiff branch 1-5 and its
# Adams branch 1-12).
METHODS: dict[str, type[Integrator]] = {
    "ETD2": ETD2,
    "RK23": _scipy_method("RK23", 3),
    "RK45": _scipy_method("RK45", 5),
    "DOP853": _scipy_method("DOP853", 8),
    "Radau": _scipy_method("Radau", 5, "sparse", scalar_rtol=True),
    "BDF": _scipy_method("BDF", (1, 5), "sparse", cache_by_value=True, scalar_rtol=True),
    "LSODA": _scipy_method("LSODA", (1, 12), "dense", cache_by_value=True),
}

# The library's default method (the CLI, sweeps and reproduce take it from here): measured fastest
# where it works, docs/theory.md §13.6. ETD2 is second order, so a path asked for below
# ACCURATE_RTOL gets the eighth-order DOP853 instead.
DEFAULT_METHOD = "ETD2"
ACCURATE_METHOD = "DOP853"
ACCURATE_RTOL = 1e-7


def default_method(rtol: float | None = None) -> str:
    """The method used when none is named: DEFAULT_METHOD, or ACCURATE_METHOD for rtol < ACCURATE_RTOL."""
    return ACCURATE_METHOD if rtol is not None and rtol < ACCURATE_RTOL else DEFAULT_METHOD
