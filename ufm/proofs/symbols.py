"""The symbols every proof shares, declared with the assumptions the statements need.

SymPy cannot declare C >= 2 directly, so where a sign depends on C - 1 > 0 the proofs substitute
``C = k + 1`` with k a positive integer (``C_GE2``). Likewise ``u > 0`` parametrizes the open
ranges the statements live on: delta = 1/(1 + u) < 1 on the collapse side of the UFM, and
eps = (C-1)/(C(1 + u)) < (C-1)/C where the theorem's norm is positive.
"""

from __future__ import annotations

import sympy

C, N = sympy.symbols("C N", positive=True, integer=True)
k = sympy.Symbol("k", positive=True, integer=True)
C_GE2 = k + 1  # C >= 2 with the sign of C - 1 = k known to SymPy
lam, lam_w, lam_h, eps, u = sympy.symbols("lam lam_w lam_h eps u", positive=True)
alpha = sympy.Symbol("alpha", real=True)  # Lemma 1's alpha ranges over all reals
