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
    """The issue's list: ETF, Lemma 1, Lemma 2, the theorem (NC1-NC4), the UFM minimizer (bias and none),
    and the minimizer with label smoothing."""
    sources = " ".join(p.source for p in PROOFS.values())
    names = " ".join(p.name for p in PROOFS.values())
    for needle in ("docs/theory.md §1", "Lemma 1", "Lemma 2", "main theorem", "docs/theory.md §5"):
        assert needle in sources
    for needle in ("NC1", "NC2", "NC3", "NC4", "with bias", "without bias", "interpolat", "label smoothing"):
        assert needle in names


LABEL_SMOOTHING_PROOFS = (
    "label_smoothing_bias", "label_smoothing_nobias", "label_smoothing_rank_one", "label_smoothing_global",
    "label_smoothing_regimes", "label_smoothing_sqi", "label_smoothing_numeric",
)  # fmt: skip


def test_label_smoothing_proofs_registered_and_named():
    """Each label-smoothing statement is registered after the a = 0 minimizer it extends, and its name
    says how it is proved: symbolically, or "checked at" given sizes."""
    keys = list(PROOFS)
    assert [k for k in keys if k.startswith("label_smoothing")] == list(LABEL_SMOOTHING_PROOFS)
    assert keys.index("label_smoothing_bias") > keys.index("ufm_global")
    for key in LABEL_SMOOTHING_PROOFS:
        name = PROOFS[key].name
        assert "label smoothing" in name and ("symbolic" in name or "checked at" in name), key
    assert "checked at" in PROOFS["label_smoothing_numeric"].name
    assert "stationary point, symbolic C, N, lam_w, lam_h, a" in PROOFS["label_smoothing_bias"].name
    assert "soft-threshold value identity, symbolic" in PROOFS["label_smoothing_global"].name


@pytest.mark.slow
@pytest.mark.parametrize("key", LABEL_SMOOTHING_PROOFS)
def test_label_smoothing_proofs_verify_at_other_points(key):
    """The label-smoothing proofs hold at another seed's spot-check points, too."""
    result = verify(key, numeric_points=4, seed=7)
    assert result.success, (result.message, result.residual)
    assert result.n_claims > 0 and (result.nfev > 0 or key == "label_smoothing_numeric")


# L-BFGS against the label-smoothing closed form: (C, N, a, bias, delta / the regime's upper end).
# lam_w != lam_h, so that the balance of W and H is found, not started from.
LBFGS_CASES = [
    (3, 2, 0.2, True, 0.5),
    (4, 3, 0.3, True, 0.6),
    (3, 2, 0.2, False, 0.5),
    (4, 3, 0.3, False, 0.6),
    (4, 2, 0.4, False, "rank_one"),
]


@pytest.mark.parametrize(("C", "N", "a", "bias", "where"), LBFGS_CASES)
def test_label_smoothing_closed_form_matches_lbfgs(C, N, a, bias, where):
    """An independent reference: L-BFGS on ufm.model from random starts reaches the closed-form loss of
    UFMProblem(..., label_smoothing=a) to 1e-8 relative, and never goes below it."""
    from ufm.model import UFMProblem
    from ufm.optimize import minimize_loss

    # delta < 1 - a (collapse), or 1 - a < delta < 1 (rank one, no bias)
    delta = 1 - a / 2 if where == "rank_one" else where * (1 - a)
    product = (delta / C) ** 2 / N  # lam_w lam_h with ufm_delta = delta
    lam_w, lam_h = np.sqrt(2 * product), np.sqrt(product / 2)
    opt = cf.ufm_optimum(C, N, lam_w, lam_h, bias=bias, label_smoothing=a)
    assert opt.geometry == (
        "rank_one" if where == "rank_one" else "simplex_etf" if bias else "smoothed_frame"
    )
    want = (
        cf.ufm_rank_one_loss(C, N, lam_w, lam_h, a)
        if where == "rank_one"
        else cf.ufm_loss(C, N, lam_w, lam_h, bias, label_smoothing=a)
    )
    assert opt.loss == pytest.approx(want, rel=1e-14)
    problem = UFMProblem(C, N, lam_w, lam_h, bias=bias, label_smoothing=a)
    res = minimize_loss(problem, C + 1, n_starts=2, seed=C)
    rel = (res.loss - opt.loss) / opt.loss
    assert -1e-12 <= rel <= 1e-8, rel


def test_cli_json_lists_every_proof(capsys, monkeypatch, results):
    """``ufm prove --json`` with the defaults renders every proof's result: the module's run of the
    suite stands in for the CLI's (the same call, which is checked), so the suite runs once."""
    calls = []
    monkeypatch.setattr("ufm.proofs.run_proofs", lambda *args, **kw: calls.append((args, kw)) or results)
    assert main(["prove", "--json"]) == 0
    assert calls == [((None,), dict(module=None, numeric_points=3, seed=0))]
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
    return lambda *args, **kwargs: 2 * f(*args, **kwargs)


def _typo_ls_loss(C, N, lam_w, lam_h, bias=True, label_smoothing=0):
    """ufm_loss with a typo: (1 - a)^2 where the kept centred mode costs delta (1 - a)."""
    delta, a = cf.ufm_delta(C, N, lam_w, lam_h), label_smoothing
    value = (C - 1) * (delta * (1 - a) ** 2 - delta**2 / 2) / C
    return value if bias else value + (delta - delta**2 / 2) / C


def _typo_rank_one_loss(C, N, lam_w, lam_h, label_smoothing=0):
    """ufm_rank_one_loss with (1 - a) where (1 - a)^2 belongs."""
    delta = cf.ufm_delta(C, N, lam_w, lam_h)
    return (delta - delta**2 / 2) / C + (C - 1) * (1 - label_smoothing) / (2 * C)


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
    ("label_smoothing_bias", {"loss": _typo_ls_loss}, "ufm_loss"),
    ("label_smoothing_nobias", {"loss": _typo_ls_loss}, "ufm_loss"),
    (
        "label_smoothing_bias",
        {"eps": lambda C, N, lw, lh, bias=True, label_smoothing=0: cf.ufm_eps(C, N, lw, lh, bias)},
        "ufm_eps",
    ),
    (
        "label_smoothing_nobias",
        {"cos_w": lambda C, N, lw, lh, bias=True, label_smoothing=0: 0 * C},
        "stationarity",
    ),
    ("label_smoothing_nobias", {"h_norm_sq": _twice(cf.ufm_h_norm_sq)}, "ufm_norm_product"),
    ("label_smoothing_rank_one", {"rank_one_loss": _typo_rank_one_loss}, "ufm_rank_one_loss"),
    ("label_smoothing_global", {"loss": _typo_ls_loss}, "value identity"),
    ("label_smoothing_regimes", {"rank_one_loss": _typo_rank_one_loss}, "perfect square"),
    (
        "label_smoothing_regimes",
        {"collapse_bound": lambda C, N, label_smoothing=0: (1 - label_smoothing) / (N * C**2)},
        "threshold",
    ),
    ("label_smoothing_sqi", {"smoothing_eps": lambda C, a: a / C}, "smoothing_eps"),
    ("label_smoothing_numeric", {"loss": _typo_ls_loss}, "ufm_optimum fields"),
    ("label_smoothing_numeric", {"rank_one_loss": _typo_rank_one_loss}, "ufm_optimum fields"),
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
    # A tolerance that decides nothing is refused: inf passes every residual, NaN and -1e-12 fail every one.
    for tol in (float("inf"), float("nan"), -1e-12):
        with pytest.raises(ValueError, match=r"^claim 'r': tol must be a finite number >= 0"):
            numeric("r", 1e3, tol=tol)


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
    Pp, P1 = A.projectors
    assert Pp.matrix(C) == sympy.eye(C) - sympy.ones(C, C) / C and P1.matrix(C) == sympy.ones(C, C) / C
    psd = IJ(C, *map(sympy.Rational, rng.integers(1, 6, 2)))  # a, b > 0: positive eigenvalues
    root = psd.sqrt()
    assert [sympy.simplify(r) for r in (root * root - psd).coefficients()] == [0, 0]
    R, M = (np.array(X.matrix(C).evalf(), dtype=float) for X in (root, psd))
    np.testing.assert_allclose(R @ R, M, rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(R).min() > 0  # the PSD root, not another one


def test_moment_closure_is_verified_and_its_rewriter_can_fail():
    """docs/theory.md §11 as matrix identities: the proof holds, and a wrong identity (E^T E = 2 D_N,
    or a dropped cross term) is reported with its rest rather than passed."""
    from ufm.proofs import moment_closure as mc

    (result,) = run_proofs(names=["moment_closure"])
    assert result.success, result.residual
    assert "symbolic sizes p, C, n" in result.name
    wrong = mc._vanishes("wrong", mc.M * mc.E.T * mc.E, 2 * mc.M * mc.DN)
    assert wrong.expr != 0 and "M*D_N" in str(wrong.expr)
    H = mc.M * mc.E.T + mc.D
    assert mc._vanishes("no cross term", H * H.T, mc.S).expr != 0


def test_matrix_claims_are_decided_for_symbolic_sizes():
    """A true identity in non-commuting matrices of symbolic size verifies; A B = B A fails, with the
    residual's size at a random explicit size."""
    import sympy

    from ufm.proofs._core import matrix_zero

    m = sympy.Symbol("m", positive=True, integer=True)
    A, B = sympy.MatrixSymbol("A", m, m), sympy.MatrixSymbol("B", m, m)
    true = Proof(
        "t",
        "(A + B)^2 expands",
        "test",
        "none",
        lambda rng: [matrix_zero("expand", (A + B) ** 2 - (A * A + A * B + B * A + B * B))],
    )
    false = Proof(
        "f", "A B = B A (false)", "test", "none", lambda rng: [matrix_zero("commute", A * B - B * A)]
    )
    assert verify(true).status == "verified"
    result = verify(false)
    assert result.status == "failed" and set(result.point) == {"m"}
