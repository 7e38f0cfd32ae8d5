"""Poster, Lemma 2 (lam > 0): global minima of the regularized square loss do not interpolate.

Homogeneity: f is positively homogeneous of degree 1 in each layer W_k (ReLU(t z) = t ReLU(z) for
t > 0, so scaling W_k keeps every activation pattern), hence <W_k, df/dW_k> = f (Euler) and

    <W_k, dL_data/dW_k> = 1/(NC) sum <f - y, f> = D   for every k.                     (H)

Gradient flow dW_k/dt = -dL/dW_k gives d||W_k||^2/dt = -2(D + lam ||W_k||^2), and so the poster's
rewriting of the loss, for any layer l,

    L = -1/4 d||W_l||^2/dt + lam/2 sum_{k != l} ||W_k||^2 + 1/(2NC) sum (||y||^2 - <y, f>).  (R)

At a critical point d||W_k||^2/dt = 0: lam ||W_k||^2 = -D = 1/(NC) sum (<y, f> - ||f||^2) (balance).
If the critical point interpolates (f = y), the right side is 0, so (R) gives L = lam/2 sum_{k != l}
||W_k||^2 while the direct evaluation gives L = lam/2 sum_k ||W_k||^2: their difference
lam/2 ||W_l||^2 must vanish, so W_l = 0 and, by homogeneity, f = 0 != y. Global minima are critical
points, so none interpolates.

Symbolically the identities are checked on a 3-layer network whose weights, inputs and targets are
all symbols, with each example's ReLU pattern fixed (the network is a polynomial on each pattern's
region, and positive scaling of a layer stays in the region); numerically, on ``ufm.model``'s deep
ReLU UFM, where the free features H are one more homogeneous layer.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import sympy

from ufm.model import UFMParams, UFMProblem, loss_and_grad, outputs
from ufm.model import loss as model_loss

from ._core import Claim, numeric, positive, register, zero
from .symbols import lam

# The symbolic network: DEPTH layers of width WIDTH, WIDTH outputs, one example per ReLU pattern.
DEPTH, WIDTH = 3, 2
# One 0/1 activation pattern per hidden layer and example (two examples: one unit off, all on).
PATTERNS = (((1, 0), (0, 1)), ((1, 1), (1, 1)))
# Numeric check on ufm.model: (C, N, depth) of deep ReLU UFMs without bias (bias breaks homogeneity).
DEEP_CASES = ((3, 2, 3), (4, 3, 4))


@cache
def _network() -> dict:
    """Symbolic weights, outputs, targets, data loss and its layer gradients."""
    Ws = [sympy.Matrix(WIDTH, WIDTH, lambda i, j, k=k: sympy.Symbol(f"w{k}_{i}{j}", real=True))
          for k in range(DEPTH)]  # fmt: skip
    n = len(PATTERNS)
    xs = [sympy.Matrix(WIDTH, 1, lambda i, _, e=e: sympy.Symbol(f"x{e}_{i}", real=True)) for e in range(n)]
    ys = [sympy.Matrix(WIDTH, 1, lambda i, _, e=e: sympy.Symbol(f"y{e}_{i}", real=True)) for e in range(n)]
    fs = []
    for x, pattern in zip(xs, PATTERNS):
        z = x
        for Wk, on in zip(Ws[:-1], pattern):
            z = sympy.diag(*on) * (Wk * z)  # ReLU on a fixed activation pattern
        fs.append(sympy.expand((Ws[-1] * z)[:, 0]))
    data = sum(((f - y).T * (f - y))[0] for f, y in zip(fs, ys)) / (2 * n)
    grads = [Wk.applyfunc(lambda w: sympy.diff(data, w)) for Wk in Ws]
    norms = [_inner(Wk, Wk) for Wk in Ws]  # ||W_k||_F^2
    # The poster's fit term 1/(2NC) sum(||y||^2 - <y, f>) and the balance's right side 1/(NC) sum(<y, f> - ||f||^2).
    fit = sum(_inner(y, y) - _inner(y, f) for f, y in zip(fs, ys)) / (2 * n)
    balance_rhs = sum(_inner(y, f) - _inner(f, f) for f, y in zip(fs, ys)) / n
    return {"Ws": Ws, "fs": fs, "ys": ys, "n": n, "data": data, "grads": grads, "norms": norms, "fit": fit,
            "balance_rhs": balance_rhs}  # fmt: skip


def _inner(A: sympy.Matrix, B: sympy.Matrix) -> sympy.Expr:
    return sum(a * b for a, b in zip(A, B))


@register(
    "lemma2_homogeneity",
    "Lemma 2 (homogeneity): <W_k, dL_data/dW_k> = 1/(NC) sum(||f||^2 - <y, f>) for every layer k "
    "(symbolic 3-layer ReLU network on fixed activation patterns; ufm.model deep ReLU gradients at random points)",
    "poster, Lemma 2 (proof sketch)",
    "weights, inputs, targets real symbols; ReLU patterns fixed; f positively 1-homogeneous in each layer",
)
def lemma2_homogeneity(rng: np.random.Generator) -> list[Claim]:
    net = _network()
    D = sum(_inner(f, f) - _inner(y, f) for f, y in zip(net["fs"], net["ys"])) / net["n"]
    claims = [
        zero(f"Lemma 2 (H): <W_{k + 1}, dL_data/dW_{k + 1}> = 1/n sum(||f||^2 - <y, f>)", _inner(Wk, g) - D)
        for k, (Wk, g) in enumerate(zip(net["Ws"], net["grads"]))
    ]
    claims += [
        zero(
            f"Lemma 2: f = 0 when W_{k + 1} = 0 (homogeneity)",
            sum(sympy.Abs(e) for f in net["fs"] for e in f.subs({w: 0 for w in Wk})),
        )
        for k, Wk in enumerate(net["Ws"])
    ]
    # ufm.model's deep ReLU UFM (H is a layer too): the same inner product for every layer.
    worst = 0.0
    for C_, N_, depth in DEEP_CASES:
        problem = UFMProblem(C_, N_, lam_w=0.0, lam_h=0.0, bias=False, depth=depth, activation="relu")
        params = UFMParams.random(problem, C_ + 2, rng=rng)
        _, grad = loss_and_grad(problem, params)  # lam = 0: the data term's gradient
        f, Y = outputs(problem, params), problem.Y
        D_num = float(np.sum(f * f) - np.sum(Y * f)) / problem.n
        inner = [float(np.sum(a * g)) for a, g in zip(params.arrays(), grad.arrays())]
        worst = max(worst, max(abs(v - D_num) for v in inner))
    claims.append(
        numeric("Lemma 2 (H): ufm.model deep ReLU, <W_k, grad_k L_data> = D for H and every W_k", worst)
    )
    return claims


@register(
    "lemma2_balance",
    "Lemma 2: along gradient flow L = -1/4 d||W_l||^2/dt + lam/2 sum_{k != l}||W_k||^2 + 1/(2NC) sum(||y||^2 - <y, f>) "
    "for every l, and at a critical point lam ||W_k||^2 = 1/(NC) sum(<y, f> - ||f||^2) "
    "(symbolic 3-layer ReLU network; ufm.model deep ReLU UFM at random points)",
    "poster, Lemma 2 (proof sketch)",
    "lam > 0; weights, inputs, targets real symbols; gradient flow dW_k/dt = -dL/dW_k",
)
def lemma2_balance(rng: np.random.Generator) -> list[Claim]:
    net = _network()
    norms, fit, balance_rhs = net["norms"], net["fit"], net["balance_rhs"]
    L = net["data"] + lam / 2 * sum(norms)
    claims = []
    for l, Wl in enumerate(net["Ws"]):
        grad_l = net["grads"][l] + lam * Wl  # dL/dW_l
        dnorm_dt = -2 * _inner(Wl, grad_l)  # d||W_l||^2/dt along dW_l/dt = -dL/dW_l
        rewritten = -dnorm_dt / 4 + lam / 2 * (sum(norms) - norms[l]) + fit
        claims.append(zero(f"Lemma 2 (R): the poster's rewriting of L with l = {l + 1}", L - rewritten))
        # lam ||W_l||^2 - balance_rhs = <W_l, dL/dW_l> by (H): it vanishes wherever the gradient does.
        claims.append(zero(f"Lemma 2 (balance): lam||W_{l + 1}||^2 - 1/n sum(<y,f> - ||f||^2) = <W_{l + 1}, dL/dW_{l + 1}>",
                           lam * norms[l] - balance_rhs - _inner(Wl, grad_l)))  # fmt: skip
    # The same rewriting on ufm.model's deep ReLU UFM with one decay lam for H and every layer.
    worst = 0.0
    for C_, N_, depth in DEEP_CASES:
        lam_ = float(rng.uniform(0.01, 0.5))
        problem = UFMProblem(C_, N_, lam_w=lam_, lam_h=lam_, bias=False, depth=depth, activation="relu")
        params = UFMParams.random(problem, C_ + 2, rng=rng)
        value, grad = loss_and_grad(problem, params)
        f, Y = outputs(problem, params), problem.Y
        fit_num = float(np.sum(Y * Y) - np.sum(Y * f)) / (2 * problem.n)
        sq = [float(np.sum(a * a)) for a in params.arrays()]
        for l, (a, g) in enumerate(zip(params.arrays(), grad.arrays())):
            rewritten = 2 * float(np.sum(a * g)) / 4 + lam_ / 2 * (sum(sq) - sq[l]) + fit_num
            worst = max(worst, abs(rewritten - value), abs(model_loss(problem, params) - value))
    claims.append(
        numeric("Lemma 2 (R): ufm.model deep ReLU, the rewriting equals the loss for every layer", worst)
    )
    return claims


@register(
    "lemma2_no_interpolation",
    "Lemma 2: an interpolating critical point (f = y) with lam > 0 would need lam||W_l||^2 = 0 for every l, "
    "hence f = 0 != y; so global minima do not interpolate (symbolic 3-layer ReLU network)",
    "poster, Lemma 2",
    "lam > 0; one-hot targets (||y|| = 1); weights, inputs real symbols",
)
def lemma2_no_interpolation(rng: np.random.Generator) -> list[Claim]:
    net = _network()
    norms, fit, balance_rhs = net["norms"], net["fit"], net["balance_rhs"]
    # Interpolation f = y, as a substitution of the targets.
    interp = {y_i: f_i for f, y in zip(net["fs"], net["ys"]) for y_i, f_i in zip(y, f)}
    direct = (net["data"] + lam / 2 * sum(norms)).subs(interp)
    claims = [
        zero(
            "Lemma 2: at f = y the balance's right side 1/n sum(<y,f> - ||f||^2) vanishes",
            balance_rhs.subs(interp),
        )
    ]
    for l in range(DEPTH):
        # (R) at a critical point (d||W_l||^2/dt = 0) and f = y, against the direct evaluation.
        via_r = (lam / 2 * (sum(norms) - norms[l]) + fit).subs(interp)
        claims.append(zero(f"Lemma 2: direct L - (R) at an interpolating critical point = lam/2 ||W_{l + 1}||^2",
                           direct - via_r - lam / 2 * norms[l]))  # fmt: skip
    one_hot = sympy.Matrix([1] + [0] * (WIDTH - 1))
    claims.append(
        positive(
            "Lemma 2: a one-hot target is nonzero, ||y||^2 > 0, so f = 0 cannot interpolate",
            _inner(one_hot, one_hot),
        )
    )
    return claims
