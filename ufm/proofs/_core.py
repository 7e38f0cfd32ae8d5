"""Proof objects, the registry, and the checker that runs them.

A proof is a list of claims, each a SymPy expression that must vanish identically ("zero") or be
positive under the symbols' assumptions ("positive"), a matrix expression in ``sympy.MatrixSymbol`` objects
of symbolic sizes that must vanish identically ("matrix"), or a number the library computed that must
vanish within a tolerance ("numeric"). The checker

1. evaluates every symbolic claim at K random points that respect the assumptions (a matrix claim
   at random sizes, with random rational matrices for its matrix symbols): a point where the claim
   does not hold is a counterexample, reported with the point and the residual;
2. decides every claim that held at those points symbolically (the expanded numerator over a common
   denominator, then expand/cancel, ``simplify`` only if those leave a rest);
3. compares numeric claims with their tolerance.

Each claim, and each proof, ends in one of ``STATUSES``: "verified" (decided symbolically, or a numeric
claim within its tolerance), "failed" (a counterexample: the point and the residual, or a numeric
claim out of tolerance) or "undecided" (SymPy could not decide it, and it held at the K random
points). A proof is verified only when every claim is; an undecided claim never counts as verified.

User proofs register through the same :func:`register` and load from a file with
``run_proofs(module=PATH)`` or ``ufm prove --module PATH`` (docs/proofs_and_testing.md).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sympy

# A proof's status is the worst of its claims' in this order: failed > undecided > verified.
STATUSES = ("verified", "failed", "undecided")

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
    statement : the claim as written, for LaTeX: ``sympy.Eq(lhs, rhs)`` when :func:`zero` was given
        both sides, else None (the LaTeX is then ``expr = 0`` or ``expr > 0``).
    """

    label: str
    expr: Any
    kind: str = "zero"
    tol: float = NUMERIC_ATOL
    statement: Any = None

    def __post_init__(self) -> None:
        # A tolerance that decides nothing: inf passes every residual, NaN or a negative one fails all.
        if self.kind == "numeric" and not (np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"claim {self.label!r}: tol must be a finite number >= 0, got {self.tol!r}")

    def latex(self) -> str | None:
        """The claim as LaTeX (``sympy.latex``), or None for a numeric claim (a number, not a formula)."""
        if self.kind == "numeric":
            return None
        if self.statement is not None:
            return sympy.latex(self.statement)
        return sympy.latex(self.expr) + (" > 0" if self.kind == "positive" else " = 0")


def zero(label: str, expr: Any, rhs: Any = None) -> Claim:
    """Claim ``expr = 0`` identically, or ``expr = rhs`` when ``rhs`` is given (kept for LaTeX)."""
    if rhs is None:
        return Claim(label, sympy.sympify(expr), "zero")
    lhs, rhs = sympy.sympify(expr), sympy.sympify(rhs)
    return Claim(label, lhs - rhs, "zero", statement=sympy.Eq(lhs, rhs, evaluate=False))


def positive(label: str, expr: Any) -> Claim:
    """Claim ``expr > 0`` for every value the symbols' assumptions allow."""
    return Claim(label, sympy.sympify(expr), "positive")


def matrix_zero(label: str, expr: Any) -> Claim:
    """A matrix identity ``expr = 0`` in ``sympy.MatrixSymbol`` objects whose sizes may be symbols."""
    return Claim(label, expr, "matrix")


def numeric(label: str, residual: float, tol: float = NUMERIC_ATOL) -> Claim:
    """Claim ``|residual| <= tol`` for a number the library computed (float64)."""
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
        closed forms (tests inject wrong formulas through them). ``rng`` is a
        ``numpy.random.Generator`` for the check's own numeric claims.
    """

    key: str
    name: str
    source: str
    assumptions: str
    check: Callable[..., list[Claim]]

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key.strip() or any(ch.isspace() for ch in self.key):
            raise ValueError(f"a proof key must be a non-empty word without spaces, got {self.key!r}")
        if not callable(self.check):
            raise ValueError(f"proof {self.key!r}: check must be callable check(rng) -> list[Claim]")


@dataclass(frozen=True)
class ClaimResult:
    """Outcome of one claim.

    Attributes
    ----------
    label, kind : copied from the claim.
    status : "verified", "failed" or "undecided" (see the module docstring).
    residual : "0" when verified; the residual at the counterexample (failed); the undecided
        expression, as text.
    point : the counterexample, symbol -> value as text (failed symbolic claims only), else None.
    points : K, the random points at which the claim was evaluated (0 for numeric claims).
    latex : the claim as LaTeX (None for numeric claims).
    """

    label: str
    kind: str
    status: str
    residual: str
    point: dict[str, str] | None
    points: int
    latex: str | None


@dataclass(frozen=True)
class ProofResult:
    """Outcome of one proof.

    Attributes
    ----------
    name, source, assumptions : copied from the proof; key its registry name.
    status : "verified", "failed" or "undecided"; success is ``status == "verified"`` (an undecided
        proof is not a success, and not a failure either: ``ufm prove`` exits 1 only on "failed").
    seconds : wall time of the check.
    residual : "0" when verified, else the residual of the first failing (or, with none failing, the
        first undecided) claim, as text.
    message : what happened: how many claims hold, the failing claim's label with its
        counterexample, or the undecided claims with K.
    n_claims : number of claims checked.
    nfev : number of random points at which the symbolic claims were evaluated.
    point : the counterexample of the first failing claim (symbol -> value as text), else None.
    claims : one :class:`ClaimResult` per claim checked (checking stops at the first failure).
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
    point: dict[str, str] | None = None
    claims: tuple[ClaimResult, ...] = ()

    @property
    def latex(self) -> list[str]:
        """LaTeX of every verified symbolic claim, in order (claims that SymPy already reduced to
        ``0 = 0`` when the check built them carry no formula and are left out)."""
        return [c.latex for c in self.claims if c.status == "verified" and c.latex not in (None, "0 = 0")]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROOFS: dict[str, Proof] = {}


def with_overrides(formulas: dict[str, Callable], overrides: dict[str, Callable]) -> dict[str, Callable]:
    """The library's formulas with some replaced (tests hand in a wrong formula to see a proof fail)."""
    unknown = set(overrides) - set(formulas)
    if unknown:
        raise ValueError(f"unknown formulas {sorted(unknown)}; valid: {', '.join(formulas)}")
    return {**formulas, **overrides}


def _add(proof: Proof) -> Proof:
    if proof.key in PROOFS:
        raise ValueError(f"proof {proof.key!r} is registered twice")
    PROOFS[proof.key] = proof
    return proof


def register(proof: Proof | str, name: str | None = None, source: str = "", assumptions: str = ""):
    """Add a proof to the registry ``PROOFS`` (the one the library's own proofs use).

    Two forms:

    * ``register(Proof(key, name, source, assumptions, check))`` registers and returns the proof;
    * ``@register(key, name, source, assumptions)`` above ``def check(rng): ...`` registers ``check``
      and returns it unchanged.

    A key registered twice raises ValueError.
    """
    if isinstance(proof, Proof):
        return _add(proof)
    if not isinstance(proof, str) or name is None:
        raise ValueError("register takes a Proof, or (key, name, source, assumptions) as a decorator")
    key = proof

    def wrap(check: Callable[..., list[Claim]]) -> Callable[..., list[Claim]]:
        _add(Proof(key, name, source, assumptions, check))
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


def _spot_check(claim: Claim, rng: np.random.Generator, points: int) -> tuple[dict | None, float]:
    """Evaluate a symbolic claim at random points: (the first counterexample or None, its residual or
    the worst |residual|)."""
    worst = 0.0
    symbols = sorted(claim.expr.free_symbols, key=str)
    for _ in range(points):
        values = {s: _random_value(s, rng) for s in symbols}
        try:
            value = complex(claim.expr.xreplace(values).evalf(EVAL_DIGITS))
        except TypeError:  # zoo, nan: the claim is undefined at a point its assumptions allow
            return values, float("nan")
        if claim.kind == "zero":
            worst = max(worst, abs(value))
            if not abs(value) <= NUMERIC_ATOL:
                return values, value.real if abs(value.imag) <= NUMERIC_ATOL else abs(value)
        elif abs(value.imag) > NUMERIC_ATOL or not value.real > 0:
            return values, value.real
    return None, worst


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


def _spot_check_matrix(claim: Claim, rng: np.random.Generator, points: int) -> tuple[dict | None, float]:
    """A matrix claim at random sizes and matrices: (the sizes and scalars of the first counterexample
    or None, its largest |entry| or the worst one)."""
    expr, worst = claim.expr, 0.0
    for _ in range(points):
        values = _random_matrices(expr, rng)
        sizes = {s: v for s, v in values.items() if not isinstance(v, sympy.MatrixBase)}
        explicit = expr.xreplace(sizes).xreplace(values).doit().as_explicit()
        residual = max((abs(complex(x.evalf(EVAL_DIGITS))) for x in explicit), default=0.0)
        worst = max(worst, residual)
        if not residual <= NUMERIC_ATOL:
            return sizes, residual
    return None, worst


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


def _check_claim(claim: Claim, rng: np.random.Generator, points: int) -> ClaimResult:
    """Counterexample search at ``points`` random points, then a symbolic decision (module docstring)."""
    if claim.kind == "numeric":
        ok = bool(np.isfinite(claim.expr)) and abs(claim.expr) <= claim.tol
        status = "verified" if ok else "failed"
        return ClaimResult(claim.label, claim.kind, status, f"{claim.expr:.3g}", None, 0, None)
    if claim.kind not in ("zero", "positive", "matrix"):
        raise ValueError(f"claim kind must be 'zero', 'positive', 'matrix' or 'numeric', got {claim.kind!r}")
    latex = claim.latex()
    spot_check = _spot_check_matrix if claim.kind == "matrix" else _spot_check
    point, residual = spot_check(claim, rng, points)
    if point is not None:
        shown = {str(s): str(v) for s, v in point.items()}
        return ClaimResult(claim.label, claim.kind, "failed", f"{residual:.6g}", shown, points, latex)
    decide = {"zero": _is_zero, "positive": _is_positive, "matrix": _is_zero_matrix}[claim.kind]
    decided = decide(claim.expr)
    if not decided:
        return ClaimResult(claim.label, claim.kind, "undecided", str(claim.expr), None, points, latex)
    return ClaimResult(claim.label, claim.kind, "verified", "0", None, points, latex)


def _point_text(point: dict[str, str]) -> str:
    return ", ".join(f"{s} = {v}" for s, v in point.items()) or "no free symbols"


def _summary(claims: list[ClaimResult], n_claims: int) -> tuple[str, str, str, dict | None]:
    """(status, residual, message, point) of a proof from its claims' results."""
    failed = [c for c in claims if c.status == "failed"]
    undecided = [c for c in claims if c.status == "undecided"]
    if failed:
        c = failed[0]
        where = "" if c.point is None else f" at {_point_text(c.point)}"
        return "failed", c.residual, f"failed: {c.label}{where}", c.point
    if undecided:
        labels = "; ".join(c.label for c in undecided)
        K = undecided[0].points
        message = (f"undecided: SymPy could not decide {len(undecided)} of {n_claims} claims, which held "
                   f"at K = {K} random points: {labels}")  # fmt: skip
        return "undecided", undecided[0].residual, message, None
    return "verified", "0", f"{n_claims} claims hold", None


def verify(
    proof: Proof | str, *, numeric_points: int = 3, seed: int = 0, **formulas: Callable[..., Any]
) -> ProofResult:
    """Run one proof (a Proof or its key), optionally with closed forms replaced by ``formulas``.

    Parameters
    ----------
    proof : the proof or its registry key.
    numeric_points : K, the random points at which every symbolic claim is evaluated (>= 1) before
        SymPy decides it; a claim SymPy cannot decide is "undecided" after holding at all K.
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
    if not isinstance(claims, (list, tuple)) or not all(isinstance(c, Claim) for c in claims):
        raise ValueError(
            f"proof {proof.key!r}: check(rng) must return a list of Claim (made by zero, positive or "
            f"numeric), got {type(claims).__name__}"
        )
    results: list[ClaimResult] = []
    for claim in claims:
        results.append(_check_claim(claim, rng, int(numeric_points)))
        if results[-1].status == "failed":
            break
    status, residual, message, point = _summary(results, len(claims))
    return ProofResult(
        proof.key, proof.name, proof.source, proof.assumptions, status, status == "verified",
        time.perf_counter() - start, residual, message, len(claims), sum(c.points for c in results),
        point, tuple(results),
    )  # fmt: skip


def _lookup(key: str) -> Proof:
    if key not in PROOFS:
        raise ValueError(f"unknown proof {key!r}; valid: {', '.join(PROOFS)}")
    return PROOFS[key]


# A user's proof file loaded once per process: its resolved path -> the keys it registered.
_LOADED: dict[Path, list[str]] = {}


def load_module(path: str | Path) -> list[str]:
    """Import a user's proof file (which calls :func:`register`) and return the keys it registered.

    A file is imported once per process; loading it again returns the same keys. A missing file, an
    error while importing it, or a file that registers nothing raises ValueError naming the file.
    """
    path = Path(path).expanduser().resolve()
    if path in _LOADED:
        return _LOADED[path]
    if not path.exists():
        raise ValueError(f"proof module {str(path)!r} does not exist")
    if not path.is_file() or path.suffix != ".py":
        raise ValueError(f"proof module {str(path)!r} is not a .py file")
    before = set(PROOFS)
    name = f"ufm_user_proofs_{len(_LOADED)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        for key in set(PROOFS) - before:
            del PROOFS[key]
        raise ValueError(f"proof module {str(path)!r} raised {type(err).__name__}: {err}") from err
    keys = [k for k in PROOFS if k not in before]
    if not keys:
        raise ValueError(
            f"proof module {str(path)!r} registers no proofs: call ufm.proofs.register(Proof(...)) in it"
        )
    _LOADED[path] = keys
    return keys


def run_proofs(
    names: Sequence[str] | None = None,
    *,
    module: str | Path | Sequence[str | Path] | None = None,
    numeric_points: int = 3,
    seed: int = 0,
) -> list[ProofResult]:
    """Run the registered proofs (all, or those named by key) and return one result each.

    Parameters
    ----------
    names : proof keys to run; default all registered proofs, or with ``module`` the proofs that
        module registers.
    module : path of a user's proof file (or several), imported first; see :func:`load_module`.
    numeric_points : K, random points per symbolic claim (see :func:`verify`).
    seed : seed of the random points.

    Every symbolic claim is evaluated at ``numeric_points`` random points that respect its assumptions
    and then decided by SymPy; numeric claims compare the library's float64 computations.
    """
    loaded: list[str] = []
    if module is not None:
        for path in [module] if isinstance(module, (str, Path)) else module:
            loaded += load_module(path)
    if names:
        keys = list(names)
    else:
        keys = loaded or list(PROOFS)
    return [verify(_lookup(k), numeric_points=numeric_points, seed=seed) for k in keys]
