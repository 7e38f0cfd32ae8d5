"""Proof objects, the registry, and the checker that runs them.

A proof is a list of claims, each a SymPy expression that must vanish identically ("zero") or be
positive under the symbols' assumptions ("positive"), a matrix expression in ``MatrixSymbol``s of
symbolic sizes that must vanish identically ("matrix"), or a number the library computed that must
vanish within a tolerance ("numeric"). The checker

1. decides every symbolic claim (the expanded numerator over a common denominator, then
   expand/cancel, ``simplify`` only if those leave a rest),
2. evaluates every symbolic claim at random points that respect the assumptions (a spot check that
   catches a simplification gone wrong, and reports the size of a failing residual; a matrix claim
   at random sizes, with random rational matrices for its matrix symbols), and
3. compares numeric claims with their tolerance.

A proof is "verified" when every claim holds; the first claim that does not is reported with its
residual.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import sympy

STATUSES = ("verified", "failed")

# Spot checks evaluate at exact rational points, then with this many significant digits where
# radicals remain, so that cancellation among O(1) terms leaves far less than NUMERIC_ATOL.
EVAL_DIGITS = 30
# A residual evaluated in float64 by the library (numeric claims) or at 30 digits (spot checks)
# counts as zero below this; the quantities compared are O(1) to O(10^2).
NUMERIC_ATOL = 1e-9
# Random points: integer symbols (C, N, sizes) in [INT_LOW, INT_HIGH]; positive reals log-uniform
# in [REAL_LOW, REAL_HIGH] (decays, eps, scales all live on this range).
INT_LOW, INT_HIGH = 2, 9
REAL_LOW, REAL_HIGH = 0.05, 3.0
# Reals are drawn as fractions with denominators up to this (dense enough to be generic points).
RATIONAL_DENOMINATOR = 997
# Matrix claims are spot-checked at sizes in [INT_LOW, MATRIX_SIZE_HIGH] (explicit SymPy matrices
# are slow; an identity of matrix polynomials that holds at random sizes >= 2 is generic).
MATRIX_SIZE_HIGH = 4


@dataclass(frozen=True)
class Claim:
    """One assertion of a proof.

    Attributes
    ----------
    label : what is asserted, with its lemma or source ("Lemma 1: L = ...").
    expr : a SymPy expression (``kind`` "zero" or "positive"), a SymPy matrix expression ("matrix")
        or a float residual ("numeric").
    kind : "zero" (expr = 0 identically), "positive" (expr > 0 under the assumptions), "matrix"
        (expr is the zero matrix for every size and every value of its matrix symbols) or
        "numeric" (|expr| <= tol).
    tol : tolerance of a numeric claim.
    """

    label: str
    expr: Any
    kind: str = "zero"
    tol: float = NUMERIC_ATOL


def zero(label: str, expr: Any) -> Claim:
    return Claim(label, sympy.sympify(expr), "zero")


def positive(label: str, expr: Any) -> Claim:
    return Claim(label, sympy.sympify(expr), "positive")


def matrix_zero(label: str, expr: Any) -> Claim:
    """A matrix identity ``expr = 0`` in ``sympy.MatrixSymbol``s whose sizes may be symbols."""
    return Claim(label, expr, "matrix")


def numeric(label: str, residual: float, tol: float = NUMERIC_ATOL) -> Claim:
    return Claim(label, float(residual), "numeric", tol)


@dataclass(frozen=True)
class Proof:
    """A statement, its source and assumptions, and the check that proves it.

    Attributes
    ----------
    key : short registry name (``ufm prove`` and ``run_proofs(names=...)`` use it).
    name : the statement, as a theorist would read it.
    source : where it comes from: "poster, Lemma 1", "docs/theory.md §5", "derived here", ...
    assumptions : the symbols and what they are declared to be.
    check : ``check(rng, **formulas) -> list[Claim]``; keyword arguments replace the library's
        closed forms (tests inject wrong formulas through them).
    """

    key: str
    name: str
    source: str
    assumptions: str
    check: Callable[..., list[Claim]]


@dataclass(frozen=True)
class ProofResult:
    """Outcome of one proof.

    Attributes
    ----------
    name, source, assumptions : copied from the proof; key its registry name.
    status : "verified" or "failed"; success is ``status == "verified"``.
    seconds : wall time of the check.
    residual : "0" when verified, else the residual of the first failing claim (a SymPy expression
        or a number, as text).
    message : the failing claim's label, or how many claims held.
    n_claims : number of claims checked.
    nfev : number of random points at which the symbolic claims were evaluated.
    """

    key: str
    name: str
    source: str
    assumptions: str
    status: str
    success: bool
    seconds: float
    residual: str
    message: str
    n_claims: int
    nfev: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROOFS: dict[str, Proof] = {}


def with_overrides(formulas: dict[str, Callable], overrides: dict[str, Callable]) -> dict[str, Callable]:
    """The library's formulas with some replaced (tests hand in a wrong formula to see a proof fail)."""
    unknown = set(overrides) - set(formulas)
    if unknown:
        raise ValueError(f"unknown formulas {sorted(unknown)}; valid: {', '.join(formulas)}")
    return {**formulas, **overrides}


def register(key: str, name: str, source: str, assumptions: str):
    """Decorator: register ``check`` as the proof ``key``."""

    def wrap(check: Callable[..., list[Claim]]) -> Callable[..., list[Claim]]:
        if key in PROOFS:
            raise ValueError(f"proof {key!r} is registered twice")
        PROOFS[key] = Proof(key, name, source, assumptions, check)
        return check

    return wrap


def _expanded_numerator(expr: sympy.Expr) -> sympy.Expr:
    """The numerator of ``together(expr)``, expanded: zero iff the rational expression is (radicals
    count as atoms). Far faster than ``cancel`` on sums of fractions in several symbols, since it
    needs no polynomial gcd."""
    return sympy.expand(sympy.fraction(sympy.together(expr))[0])


def _is_zero(expr: sympy.Expr) -> bool:
    """Decide expr == 0 identically: cheap normal forms first, ``simplify`` as the last resort."""
    if expr == 0 or _expanded_numerator(expr) == 0:
        return True
    for normal in (sympy.expand, sympy.cancel, sympy.radsimp, sympy.simplify):
        expr = normal(expr)
        if expr == 0:
            return True
    return False


def _is_positive(expr: sympy.Expr) -> bool:
    """Decide expr > 0 from the symbols' assumptions (after factoring, which exposes the signs)."""
    if expr.is_positive:
        return True
    return bool(sympy.factor(sympy.cancel(expr)).is_positive)


def _random_value(symbol: sympy.Symbol, rng: np.random.Generator) -> sympy.Expr:
    if symbol.is_integer:
        return sympy.Integer(int(rng.integers(INT_LOW, INT_HIGH + 1)))
    value = float(np.exp(rng.uniform(np.log(REAL_LOW), np.log(REAL_HIGH))))
    if not symbol.is_positive:
        value *= rng.choice([-1.0, 1.0])
    # An exact rational point: SymPy then evaluates polynomials exactly, far faster than evalf's subs.
    return sympy.Rational(value).limit_denominator(RATIONAL_DENOMINATOR)


def _spot_check(claim: Claim, rng: np.random.Generator, points: int) -> tuple[bool, float]:
    """Evaluate a symbolic claim at random points; (holds everywhere, worst |residual|)."""
    worst = 0.0
    symbols = sorted(claim.expr.free_symbols, key=str)
    for _ in range(points):
        values = {s: _random_value(s, rng) for s in symbols}
        value = complex(claim.expr.xreplace(values).evalf(EVAL_DIGITS))
        if claim.kind == "zero":
            worst = max(worst, abs(value))
            if abs(value) > NUMERIC_ATOL:
                return False, abs(value)
        elif abs(value.imag) > NUMERIC_ATOL or value.real <= 0:
            return False, value.real
    return True, worst


def _random_matrices(expr: sympy.MatrixExpr, rng: np.random.Generator) -> dict:
    """Random sizes for the size symbols of ``expr``, then random rational entries for its matrix
    symbols and random values for its other symbols: a substitution that makes it explicit."""
    matrices = sorted(expr.atoms(sympy.MatrixSymbol), key=str)
    size_symbols = {s for m in matrices for d in m.shape for s in sympy.sympify(d).free_symbols}
    sizes = {
        s: sympy.Integer(int(rng.integers(INT_LOW, MATRIX_SIZE_HIGH + 1)))
        for s in sorted(size_symbols, key=str)
    }
    values = dict(sizes)
    scalars = expr.free_symbols - set(matrices) - size_symbols
    values.update({s: _random_value(s, rng) for s in sorted(scalars, key=str)})
    for m in matrices:
        rows, cols = (int(sympy.sympify(d).xreplace(sizes)) for d in m.shape)
        entries = rng.integers(-9, 10, size=(rows, cols))
        values[m.xreplace(sizes)] = sympy.Matrix(entries) / 7
    return values


def _spot_check_matrix(expr: sympy.MatrixExpr, rng: np.random.Generator, points: int) -> tuple[bool, float]:
    worst = 0.0
    for _ in range(points):
        values = _random_matrices(expr, rng)
        sizes = {s: v for s, v in values.items() if not isinstance(v, sympy.MatrixBase)}
        explicit = expr.xreplace(sizes).xreplace(values).doit().as_explicit()
        residual = max((abs(complex(x.evalf(EVAL_DIGITS))) for x in explicit), default=0.0)
        worst = max(worst, residual)
        if residual > NUMERIC_ATOL:
            return False, residual
    return True, worst


def _distributed_power(power: sympy.MatPow) -> sympy.MatrixExpr:
    """(a_1 + ... + a_m)^k as the sum of the m^k ordered products (SymPy folds X X back into X**2)."""
    terms = power.base.args if isinstance(power.base, sympy.MatAdd) else (power.base,)
    products = list(terms)
    for _ in range(int(power.exp) - 1):
        products = [sympy.MatMul(p, t) for p in products for t in terms]
    return sympy.MatAdd(*products)


def _is_zero_matrix(expr: sympy.MatrixExpr) -> bool:
    """Expand products of matrix sums (integer powers distributed first: SymPy's ``expand`` leaves
    ``(A + B)**2`` alone) and compare with the zero matrix."""
    is_power = lambda x: isinstance(x, sympy.MatPow) and x.exp.is_Integer and x.exp > 1
    expanded = sympy.expand(expr.replace(is_power, _distributed_power))
    return expanded == 0 or bool(getattr(expanded, "is_ZeroMatrix", False))


def _check_claim(claim: Claim, rng: np.random.Generator, points: int) -> tuple[bool, str, int]:
    """(holds, residual as text, points evaluated) for one claim."""
    if claim.kind == "numeric":
        ok = bool(np.isfinite(claim.expr)) and abs(claim.expr) <= claim.tol
        return ok, f"{claim.expr:.3g}", 0
    if claim.kind == "matrix":
        spot_ok, spot = _spot_check_matrix(claim.expr, rng, points)
        if not spot_ok:
            return False, f"{sympy.expand(claim.expr)} (max entry {spot:.3g} at random sizes)", points
        if not _is_zero_matrix(claim.expr):
            return False, f"{sympy.expand(claim.expr)} (not decided symbolically)", points
        return True, "0", points
    if claim.kind not in ("zero", "positive"):
        raise ValueError(f"claim kind must be 'zero', 'positive', 'matrix' or 'numeric', got {claim.kind!r}")
    spot_ok, spot = _spot_check(claim, rng, points)
    if not spot_ok:
        return False, f"{sympy.simplify(claim.expr)} (= {spot:.3g} at a random point)", points
    symbolic_ok = _is_zero(claim.expr) if claim.kind == "zero" else _is_positive(claim.expr)
    if not symbolic_ok:
        return False, f"{sympy.simplify(claim.expr)} (not decided symbolically)", points
    return True, "0", points


def verify(
    proof: Proof | str, *, numeric_points: int = 3, seed: int = 0, **formulas: Callable[..., Any]
) -> ProofResult:
    """Run one proof (a Proof or its key), optionally with closed forms replaced by ``formulas``.

    Parameters
    ----------
    proof : the proof or its registry key.
    numeric_points : random points at which every symbolic claim is also evaluated (>= 1).
    seed : seed of those points and of the numeric checks.
    formulas : replacements for the closed forms the check takes as keyword arguments, e.g.
        ``cosine=lambda C: -1/C``; an unknown name raises ValueError.
    """
    proof = _lookup(proof) if isinstance(proof, str) else proof
    if int(numeric_points) < 1:
        raise ValueError(f"numeric_points must be >= 1, got {numeric_points}")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    try:
        inspect.signature(proof.check).bind(rng, **formulas)
    except TypeError as err:
        raise ValueError(f"proof {proof.key!r} does not take these formulas: {err}") from err
    claims = proof.check(rng, **formulas)
    status, residual, message, nfev = "verified", "0", f"{len(claims)} claims hold", 0
    for claim in claims:
        ok, res, evaluated = _check_claim(claim, rng, int(numeric_points))
        nfev += evaluated
        if not ok:
            status, residual, message = "failed", res, f"failed: {claim.label}"
            break
    return ProofResult(
        proof.key, proof.name, proof.source, proof.assumptions, status, status == "verified",
        time.perf_counter() - start, residual, message, len(claims), nfev,
    )  # fmt: skip


def _lookup(key: str) -> Proof:
    if key not in PROOFS:
        raise ValueError(f"unknown proof {key!r}; valid: {', '.join(PROOFS)}")
    return PROOFS[key]


def run_proofs(
    names: list[str] | None = None, *, numeric_points: int = 3, seed: int = 0
) -> list[ProofResult]:
    """Run the registered proofs (all, or those named by key) and return one result each.

    Every symbolic claim is decided by SymPy and also evaluated at ``numeric_points`` random points
    that respect its assumptions; numeric claims compare the library's float64 computations.
    """
    proofs = list(PROOFS.values()) if names is None else [_lookup(k) for k in names]
    return [verify(p, numeric_points=numeric_points, seed=seed) for p in proofs]
