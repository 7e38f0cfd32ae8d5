"""ufm.proofs: the suite verifies, the CLI reports it, and the checker fails on wrong formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sympy

from ufm import closed_form as cf
from ufm import proofs
from ufm.cli import main

PROOFS, Proof, ProofResult, run_proofs, verify = (
    proofs.PROOFS, proofs.Proof, proofs.ProofResult, proofs.run_proofs, proofs.verify
)  # fmt: skip
STATUSES, numeric, positive, zero = (
    proofs._core.STATUSES,
    proofs._core.numeric,
    proofs._core.positive,
    proofs._core.zero,
)
IJ = proofs.algebra.IJ


@pytest.fixture(scope="module")
def results() -> list[ProofResult]:
    return run_proofs()


def test_whole_suite_verifies(results):
    """Every registered statement is verified, with a source, assumptions and a time."""
    assert [r.key for r in results] == list(PROOFS)
    failed = [(r.key, r.message, r.residual) for r in results if not r.success]
    assert failed == []
    for r in results:
        assert r.status == "verified" and r.residual == "0"
        assert r.source and r.assumptions and r.n_claims > 0 and r.seconds >= 0


def test_suite_covers_the_statements():
    """The issue's list: ETF, Lemma 1, Lemma 2, the theorem (NC1-NC4), the UFM minimizer (bias and none)."""
    sources = " ".join(p.source for p in PROOFS.values())
    names = " ".join(p.name for p in PROOFS.values())
    for needle in ("THEORY.md 1", "Lemma 1", "Lemma 2", "main theorem", "THEORY.md 5"):
        assert needle in sources
    for needle in ("NC1", "NC2", "NC3", "NC4", "with bias", "without bias", "interpolat"):
        assert needle in names


def test_cli_json_lists_every_proof(capsys):
    assert main(["prove", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["key"] for row in rows] == list(PROOFS)
    for row in rows:
        assert {"name", "source", "status", "seconds"} <= set(row)
        assert row["status"] in STATUSES and row["status"] == "verified"
        assert isinstance(row["seconds"], float)


def test_cli_table_and_failure_exit(capsys, monkeypatch):
    """A failing proof gives exit status 1 and is shown with its residual; an unknown name exits 2."""
    bogus = Proof(
        "bogus", "1 = 2 (deliberately false)", "test", "none", lambda rng: [zero("1 - 2 = 0", 1 - 2)]
    )
    monkeypatch.setitem(PROOFS, "bogus", bogus)
    assert main(["prove", "etf", "bogus"]) == 1
    out = capsys.readouterr().out
    assert "etf" in out and "verified" in out and "failed" in out and "residual: -1" in out
    assert main(["prove", "no_such_proof"]) == 2
    assert "unknown proof" in capsys.readouterr().err


def _twice(f):
    return lambda *args: 2 * f(*args)


WRONG_FORMULAS = [
    ("etf", {"cosine": lambda C: -1 / C}, "cosine"),
    ("theorem_nc3_nc2", {"cosine": lambda C: -1 / C}, "equiangularity"),
    ("theorem_nc3_nc2", {"norm_sq": _twice(cf.sqi_w_row_norm_sq)}, "equinorm"),
    ("theorem_nc3_nc2", {"scale": lambda C, eps, lam: eps / (lam * C)}, "NC3"),
    ("theorem_nc4", {"scale": lambda C, eps, lam: -cf.sqi_w_scale(C, eps, lam)}, "s > 0"),
    ("lemma1", {"loss": lambda C, a: (1 - a) ** 2 + a**2 / (C - 1)}, "Lemma 1"),
    ("lemma1", {"alpha_star": lambda C: (C - 1) / (C + 1)}, "alpha_star"),
    ("ufm_stationarity_bias", {"w_row_norm_sq": _twice(cf.ufm_w_row_norm_sq)}, "stationarity"),
    ("ufm_stationarity_nobias", {"h_norm_sq": _twice(cf.ufm_h_norm_sq)}, "stationarity"),
    ("ufm_stationarity_bias", {"eps": lambda C, N, lw, lh, bias=True: cf.ufm_delta(C, N, lw, lh)}, "eps"),
    ("ufm_stationarity_nobias", {"loss": _twice(cf.ufm_loss)}, "ufm_loss"),
    ("ufm_global", {"loss": _twice(cf.ufm_loss)}, "ufm_loss"),
    ("ufm_global", {"collapse_bound": lambda C, N: 1 / (N * C)}, "threshold"),
]


@pytest.mark.parametrize(
    ("key", "formulas", "label"), WRONG_FORMULAS, ids=[f"{k}-{next(iter(f))}" for k, f, _ in WRONG_FORMULAS]
)
def test_wrong_formula_fails(key, formulas, label):
    """The checker can fail: a deliberately wrong closed form is reported, with a nonzero residual."""
    result = verify(key, **formulas)
    assert result.status == "failed" and not result.success
    assert label in result.message
    assert result.residual != "0"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown proof"):
        run_proofs(["nope"])
    with pytest.raises(ValueError, match="numeric_points"):
        verify("etf", numeric_points=0)
    with pytest.raises(ValueError, match="unknown formulas"):
        verify("ufm_global", cosine=cf.sqi_cosine)
    with pytest.raises(ValueError, match="does not take"):
        verify("lemma1", cosine=cf.sqi_cosine)


def test_claim_kinds():
    """False positivity and a non-finite numeric residual fail; true claims pass."""
    x = sympy.Symbol("x", positive=True)
    cases = {
        "ok": ([zero("x - x", x - x), positive("x + 1 > 0", x + 1), numeric("tiny", 1e-12)], "verified"),
        "neg": ([positive("-x > 0", -x)], "failed"),
        "nan": ([numeric("nan", float("nan"))], "failed"),
        "big": ([numeric("1e-3", 1e-3)], "failed"),
    }
    for key, (claims, status) in cases.items():
        proof = Proof(key, key, "test", "x > 0", lambda rng, c=claims: c)
        assert verify(proof).status == status, key


@pytest.mark.parametrize("C", [2, 3, 5, 7])
def test_ij_algebra_matches_explicit_matrices(C):
    """The I/J algebra (J^2 = C J) against explicit C x C matrices: products, entries, norms, eigenvalues."""
    rng = np.random.default_rng(C)
    A, B = (IJ(C, *map(sympy.Rational, rng.integers(-5, 6, 2))) for _ in range(2))
    MA, MB = (X.a * sympy.eye(C) + X.b * sympy.ones(C, C) for X in (A, B))
    P = A * B
    assert P.a * sympy.eye(C) + P.b * sympy.ones(C, C) == MA * MB
    assert (A.diag, A.off) == (MA[0, 0], MA[0, 1])
    assert A.frob_sq == sum(x**2 for x in MA) and A.trace == MA.trace()
    eig = MA.eigenvals()
    assert eig.get(A.eig_perp, 0) >= C - 1 and A.row_sum in eig
