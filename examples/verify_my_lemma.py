"""Verify a lemma of your own with ufm's proof checker: one true claim, one false, one undecided.

    ufm prove --module examples/verify_my_lemma.py            # the table
    ufm prove --module examples/verify_my_lemma.py --latex    # and each formula as LaTeX
    python examples/verify_my_lemma.py                        # the same, from Python

Only the public API is used: ``ufm.proofs`` gives the claim makers (``zero``, ``positive``), the
symbols the library's own proofs use (C a positive integer, ``C_GE2 = k + 1`` for C >= 2, alpha real)
and the I/J algebra (``IJ``: the C x C matrices a I + b J, J = 11^T, for symbolic C). Each proof is a
``Proof(key, name, source, assumptions, check)`` passed to ``register``; ``check(rng)`` returns the
claims. The outcomes (docs/proofs_and_testing.md):

* ``my_centring`` is verified: SymPy decides every claim.
* ``my_wrong_cosine`` fails: its claimed cosine -1/C is wrong (it is -1/(C-1)); the checker reports a
  counterexample, the value of C and the residual -1/(C(C-1)) there.
* ``my_loss_positive`` is undecided: L(alpha) = ((1-alpha)^2 + alpha^2/(C-1))/2 > 0 is true, but
  SymPy's assumptions only see a sum of squares (>= 0); it held at K random points (``--points K``).
"""

from ufm import lemma1_loss
from ufm.proofs import C_GE2, IJ, C, Proof, alpha, positive, register, run_proofs, zero


def centring(rng):
    P = IJ.centring(C)  # I - J/C
    return [
        *(zero("P^2 = P (coefficient of I, of J)", r) for r in (P * P - P).coefficients()),
        zero("tr P = C - 1", P.trace, C - 1),
        zero("||P||_F^2 = C - 1", P.frob_sq, C - 1),
    ]


def wrong_cosine(rng):
    G = C / (C - 1) * IJ.centring(C)  # Gram matrix of a simplex ETF with unit columns
    return [
        zero("unit columns: diag G = 1", G.diag, 1),
        zero("cosine of distinct columns = -1/C (wrong: it is -1/(C-1))", G.off / G.diag, -1 / C),
    ]


def loss_positive(rng):
    return [positive("Lemma 1: L(alpha) > 0 for every real alpha", lemma1_loss(C_GE2, alpha))]


register(Proof("my_centring", "I - J/C is a projector of rank C-1", "my notes", "C >= 1 integer", centring))
register(
    Proof("my_wrong_cosine", "the simplex ETF's cosine is -1/C", "a wrong guess", "C >= 2", wrong_cosine)
)
register(
    Proof(
        "my_loss_positive",
        "Lemma 1's loss is positive",
        "poster, Lemma 1",
        "C >= 2, alpha real",
        loss_positive,
    )
)

if __name__ == "__main__":
    # Registered above in this process, so run by key (run_proofs(module=...) is for other files).
    for r in run_proofs(["my_centring", "my_wrong_cosine", "my_loss_positive"]):
        print(f"{r.key:<17} {r.status:<9} {r.message}")
        if r.status == "failed":
            print(f"{'':<17} counterexample {r.point}, residual {r.residual}")
