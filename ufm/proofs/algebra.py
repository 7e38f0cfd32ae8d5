"""The algebra spanned by I and J = 11^T (C x C), in which every class-symmetric matrix lives.

A matrix ``a I + b J`` is stored as the pair (a, b) of SymPy expressions; C stays a symbol, so
identities proved here hold for every number of classes at once, not at fixed sizes. The one rule
needed is J^2 = C J (1^T 1 = C), which makes the set closed under products:

    (a I + b J)(c I + d J) = ac I + (ad + bc + C bd) J.

Facts used by the proofs (each a one-line consequence of J 1 = C 1 and J x = 0 for x orthogonal to 1):

* entries: diagonal a + b, off-diagonal b;
* eigenvalues: a + C b on 1 (once) and a on 1^perp (C - 1 times), so that
  a I + b J = a P_perp + (a + C b) P_1 with P_perp = I - J/C, P_1 = J/C, and functions (square roots)
  act on the two eigenvalues;
* trace C (a + b); squared Frobenius norm of a symmetric element C (a + b)^2 + C (C - 1) b^2;
* with the one-hot targets Y (C, N C), Y Y^T = N I, so ||A Y||_F^2 = N ||A||_F^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy


@dataclass(frozen=True)
class IJ:
    """The C x C matrix ``a I + b J`` with J = 11^T (symmetric, class-symmetric)."""

    C: Any
    a: Any
    b: Any = sympy.Integer(0)

    @classmethod
    def identity(cls, C: Any) -> IJ:
        return cls(C, sympy.Integer(1), sympy.Integer(0))

    @classmethod
    def ones(cls, C: Any) -> IJ:
        """J = 11^T."""
        return cls(C, sympy.Integer(0), sympy.Integer(1))

    @classmethod
    def centring(cls, C: Any) -> IJ:
        """I - J/C, the projector onto 1^perp."""
        return cls(C, sympy.Integer(1), -sympy.Integer(1) / C)

    def _other(self, other: IJ) -> IJ:
        if sympy.sympify(self.C) != sympy.sympify(other.C):
            raise ValueError(f"IJ elements of different sizes: {self.C} and {other.C}")
        return other

    def __add__(self, other: IJ) -> IJ:
        o = self._other(other)
        return IJ(self.C, self.a + o.a, self.b + o.b)

    def __sub__(self, other: IJ) -> IJ:
        o = self._other(other)
        return IJ(self.C, self.a - o.a, self.b - o.b)

    def __neg__(self) -> IJ:
        return IJ(self.C, -self.a, -self.b)

    def __mul__(self, other: Any) -> IJ:
        if isinstance(other, IJ):
            o = self._other(other)
            # J^2 = C J
            return IJ(self.C, self.a * o.a, self.a * o.b + self.b * o.a + self.C * self.b * o.b)
        return IJ(self.C, self.a * other, self.b * other)

    __rmul__ = __mul__  # scalars commute; products of two IJ go through __mul__ (the algebra is commutative)

    def __truediv__(self, scalar: Any) -> IJ:
        return IJ(self.C, self.a / scalar, self.b / scalar)

    @property
    def diag(self) -> Any:
        """Every diagonal entry, a + b."""
        return self.a + self.b

    @property
    def off(self) -> Any:
        """Every off-diagonal entry, b."""
        return self.b

    @property
    def row_sum(self) -> Any:
        """(a I + b J) 1 = (a + C b) 1: the eigenvalue on the all-ones vector."""
        return self.a + self.C * self.b

    @property
    def eig_perp(self) -> Any:
        """Eigenvalue on 1^perp (multiplicity C - 1)."""
        return self.a

    @property
    def trace(self) -> Any:
        return self.C * (self.a + self.b)

    @property
    def frob_sq(self) -> Any:
        """||a I + b J||_F^2 = C (a + b)^2 + C (C - 1) b^2."""
        return self.C * self.diag**2 + self.C * (self.C - 1) * self.off**2

    @property
    def projectors(self) -> tuple[IJ, IJ]:
        """(P_perp, P_1) = (I - J/C, J/C): the orthogonal idempotents onto 1^perp and onto 1."""
        return IJ.centring(self.C), IJ.ones(self.C) / self.C

    def sqrt(self) -> IJ:
        """The PSD square root sqrt(eig_perp) P_perp + sqrt(row_sum) P_1 (for a PSD element).

        Each eigenvalue is factored before its root is taken, so that SymPy splits the root of a
        product of positive factors (the proofs' parametrizations make the eigenvalues such products).
        """
        P_perp, P_1 = self.projectors
        root = lambda x: sympy.sqrt(sympy.factor(sympy.cancel(x)))
        return root(self.eig_perp) * P_perp + root(self.row_sum) * P_1

    def coefficients(self) -> tuple[Any, Any]:
        """(a, b): the element is zero iff both vanish (I and J are linearly independent for C >= 2)."""
        return self.a, self.b

    def matrix(self, C: int) -> sympy.Matrix:
        """The explicit C x C matrix at a given size (for spot checks)."""
        sub = {self.C: C} if isinstance(self.C, sympy.Basic) else {}
        a, b = sympy.sympify(self.a).subs(sub), sympy.sympify(self.b).subs(sub)
        return a * sympy.eye(C) + b * sympy.ones(C, C)
