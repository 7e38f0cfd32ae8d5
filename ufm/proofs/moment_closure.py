"""The moment closure of docs/theory.md §11, as matrix identities for symbolic sizes.

Square loss, linear layers: f = A H + b 1_n^T with A = W_L ... W_1 (C x p). With H = M E^T + D, the
features split into their class means M (p x C) and deviations D (p x n); E (n x C) holds the class
indicators. Three facts about E and D are all the derivation uses:

    D E = 0 (deviations sum to zero in each class),   E^T E = D_N (the counts),   E 1_C = 1_n.

The identities are stated with SymPy ``MatrixSymbol`` of symbolic sizes p, C, n, expanded as
non-commutative products, and decided by rewriting adjacent factors with those three facts (plus
D D^T = S and D_N D_N^{-1} = I) until nothing changes: a claim holds when the difference of its two
sides rewrites to the zero matrix. The depth enters only through A and the chain rule from dL/dA to
each W_k, which is the same for the full and the moment flow; a numeric claim checks the library's
``moment_velocity`` against the full model's gradient at random states of depth 1 and 2.
"""

from __future__ import annotations

import numpy as np
import sympy
from sympy import Identity, MatAdd, MatMul, MatrixSymbol, Transpose, ZeroMatrix

from ._core import Claim, matrix_zero, numeric, register, zero

p, C, n = sympy.symbols("p C n", positive=True, integer=True)
lam_h = sympy.Symbol("lam_h", positive=True)
A = MatrixSymbol("A", C, p)  # the end-to-end linear map W_L ... W_1
M = MatrixSymbol("M", p, C)  # class means, columns
D = MatrixSymbol("D", p, n)  # deviations from the class means
E = MatrixSymbol("E", n, C)  # class indicators, E = Y^T
DN = MatrixSymbol("D_N", C, C)  # diag(N_c) = E^T E
DN_inv = MatrixSymbol("D_N^-1", C, C)
S = MatrixSymbol("S", p, p)  # D D^T
L = MatrixSymbol("L", p, p)  # the flow's factor of S = L L^T (docs/theory.md §11.1)
K_ = MatrixSymbol("K", p, p)  # a general p x p matrix, for the factor's identities
T_c = MatrixSymbol("T_c", C, C)  # the classes' targets, T = T_c E^T
b = MatrixSymbol("b", C, 1)
one_C = MatrixSymbol("1_C", C, 1)

# Adjacent factors and what they rewrite to (None: the product vanishes).
_RULES = {
    (D, E): None,
    (Transpose(E), Transpose(D)): None,
    (Transpose(E), E): DN,
    (DN, DN_inv): Identity(C),
    (DN_inv, DN): Identity(C),
    (D, Transpose(D)): S,
}
# Rewriting passes before giving up (each pass shortens a product; three suffice here).
_MAX_PASSES = 10


def _rewrite_term(term: sympy.Expr) -> sympy.Expr:
    """One product with the rules applied to adjacent factors, left to right."""
    if not isinstance(term, MatMul):
        return term
    scalars = [a for a in term.args if not getattr(a, "is_Matrix", False)]
    factors = [a for a in term.args if getattr(a, "is_Matrix", False)]
    out: list = []
    for f in factors:
        if out and (out[-1], f) in _RULES:
            rule = _RULES[(out.pop(), f)]
            if rule is None:
                return ZeroMatrix(*term.shape)
            if rule != Identity(C):
                out.append(rule)
            continue
        out.append(f)
    if not out:
        return MatMul(*scalars, Identity(term.shape[0]))
    return MatMul(*scalars, *out)


def rewrite(expr: sympy.Expr) -> sympy.Expr:
    """Expand ``expr`` and apply the rules until it stops changing."""
    for _ in range(_MAX_PASSES):
        expanded = sympy.expand(expr.doit())
        terms = expanded.args if isinstance(expanded, MatAdd) else (expanded,)
        new = MatAdd(*[_rewrite_term(t) for t in terms]).doit() if terms else expanded
        if new == expr:
            break
        expr = new
    return sympy.expand(expr.doit())


def _vanishes(label: str, lhs: sympy.Expr, rhs: sympy.Expr) -> Claim:
    """zero(label, 0) when lhs - rhs rewrites to the zero matrix; else a residual naming the rest."""
    rest = rewrite(lhs - rhs)
    is_zero = rest == 0 or isinstance(rest, ZeroMatrix)
    return zero(label, sympy.Integer(0) if is_zero else sympy.Symbol(f"rest[{rest}]"))


def _library_check(rng: np.random.Generator) -> list[Claim]:
    """The library's moment_velocity against the full gradient projected by hand, at random states."""
    from ufm.dynamics.moments import moment_velocity, moments_from_params, scatter_factor
    from ufm.model import UFMParams, UFMProblem, loss_and_grad

    claims = []
    for depth, counts in ((1, (3, 2, 4)), (2, (2, 4, 3))):
        problem = UFMProblem(3, counts, 0.07, 0.05, lam_b=0.2, depth=depth, label_smoothing=0.1)
        x = UFMParams.random(problem, 4, rng=rng)
        x = UFMParams(x.H, x.Ws, rng.standard_normal(problem.C))
        value, g = loss_and_grad(problem, x)
        labels = problem.labels
        mean = np.stack([x.H[:, labels == c].mean(axis=1) for c in range(problem.C)], axis=1)
        dmean = np.stack([-g.H[:, labels == c].mean(axis=1) for c in range(problem.C)], axis=1)
        Dv, dD = x.H - mean[:, labels], -g.H - dmean[:, labels]
        m = moments_from_params(problem, x)
        L = scatter_factor(m.S)
        loss, (dM, dWs, db, dL), grad_sq = moment_velocity(problem, m.M, list(m.Ws), m.b, L)
        dS = dL @ L.T + L @ dL.T
        err = max(
            abs(loss - value), np.abs(dM - dmean).max(), np.abs(db + g.b).max(),
            np.abs(dS - (dD @ Dv.T + Dv @ dD.T)).max(), abs(np.sqrt(grad_sq) - np.linalg.norm(g.ravel())),
            *(np.abs(dW + gW).max() for dW, gW in zip(dWs, g.Ws)),
        )  # fmt: skip
        claims.append(
            numeric(
                f"library: moment_velocity = projected full gradient (depth {depth}, counts {counts})", err
            )
        )
    return claims


@register(
    "moment_closure",
    "Moment closure: for the square loss with linear layers, the loss, dL/dA, b', the class-mean and "
    "deviation velocities, S' and ||grad_H L||^2 depend on H only through (M, S), and a factor L' = -K L "
    "of S = L L^T carries S' (matrix identities, symbolic sizes p, C, n via MatrixSymbol; any depth "
    "through A = W_L..W_1)",
    "docs/theory.md §11 (derived here)",
    "p, C, n positive integers; D E = 0, E^T E = D_N, E 1_C = 1_n, S = D D^T; lam_h > 0; square loss",
)
def moment_closure(rng: np.random.Generator) -> list[Claim]:
    H = M * E.T + D
    R = A * M + b * one_C.T - T_c  # residual at the class means (C x C)
    resid = A * H + b * (E * one_C).T - T_c * E.T  # f - T, with 1_n = E 1_C and T = T_c E^T
    H_dot = -(A.T * resid) / n - lam_h * H  # -grad_H L
    M_dot = -(A.T * R) / n - lam_h * M
    K = A.T * A / n + lam_h * Identity(p)
    D_dot = -K * D
    return [
        _vanishes("§11: f - T = R E^T + A D", resid, R * E.T + A * D),
        _vanishes(
            "§11: (f - T)(f - T)^T = R D_N R^T + A S A^T (the loss's data term, before the trace)",
            resid * resid.T,
            R * DN * R.T + A * S * A.T,
        ),  # fmt: skip
        _vanishes("§11: H H^T = M D_N M^T + S (the feature penalty)", H * H.T, M * DN * M.T + S),
        _vanishes(
            "§11: dL_data/dA = (1/n)(f - T) H^T = (1/n)(R D_N M^T + A S)",
            resid * H.T / n,
            (R * DN * M.T + A * S) / n,
        ),  # fmt: skip
        _vanishes("§11: (f - T) 1_n = R D_N 1_C (the bias gradient)", resid * E * one_C, R * DN * one_C),
        _vanishes("§11: class means of H': H' E D_N^-1 = M'", H_dot * E * DN_inv, M_dot),
        _vanishes(
            "§11: deviations of H': H' - H' E D_N^-1 E^T = -K D", H_dot - H_dot * E * DN_inv * E.T, D_dot
        ),
        _vanishes(
            "§11: S' = D' D^T + D D'^T = -(K S + S K)",
            D_dot * D.T + D * D_dot.T,
            -(K * S + S * K),
        ),  # fmt: skip
        _vanishes(
            "§11: H' H'^T = M' D_N M'^T + K S K (||grad_H L||^2, before the trace)",
            H_dot * H_dot.T,
            M_dot * DN * M_dot.T + K * S * K,
        ),  # fmt: skip
        # §11.1: the flow carries a factor L of S; free matrix symbols (K_ a general p x p matrix, then
        # K's symmetry), decided by the checker's "matrix" kind: no relations between symbols needed.
        matrix_zero(
            "§11.1: L' = -K L gives (L L^T)' = L' L^T + L L'^T = -(K (L L^T) + (L L^T) K^T)",
            (-K_ * L) * L.T + L * (-K_ * L).T + (K_ * L * L.T + L * L.T * K_.T),
        ),
        matrix_zero("§11.1: K^T = K, so (L L^T)' = -(K S + S K) = S'", K.T - K),
        matrix_zero(
            "§11.1: K (L L^T) K^T = (K L)(K L)^T, so tr(K S K) = ||L'||_F^2",
            K_ * L * L.T * K_.T - (K_ * L) * (K_ * L).T,
        ),
        *_library_check(rng),
    ]
