"""The proof plugin API: a user's file outside the repository, written against ``ufm.proofs`` only,
runs with ``ufm prove --module`` and ``run_proofs(module=...)``; its true, false and undecidable
claims come out verified, failed (with the counterexample) and undecided (with K)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from ufm import proofs
from ufm.cli import main

ROOT = Path(__file__).resolve().parents[1]

USER_FILE = textwrap.dedent("""
    import sympy
    from ufm.proofs import IJ, Proof, C, numeric, positive, register, zero

    x = sympy.Symbol("x", real=True)

    def true_claims(rng):
        P = IJ.centring(C)
        return [zero("tr(I - J/C) = C - 1", P.trace, C - 1), numeric("float", 1e-13)]

    def false_claim(rng):
        # (a + b)^2 = a^2 + b^2 with b = 1/C: wrong by 2/C for a = 1
        return [zero("(1 + 1/C)^2 = 1 + 1/C^2", (1 + 1 / C) ** 2, 1 + 1 / C**2)]

    def undecidable(rng):
        return [positive("x^2 - x + 1 > 0 for real x", x**2 - x + 1)]

    register(Proof("user_true", "a true lemma", "tmp file", "C >= 1", true_claims))
    register(Proof("user_false", "a false lemma", "tmp file", "C >= 1", false_claim))
    register(Proof("user_undecided", "a true lemma SymPy cannot decide", "tmp file", "x real", undecidable))
""")


@pytest.fixture
def user_file(tmp_path):
    """The user's file in a temporary directory; the registry is restored afterwards."""
    path = tmp_path / "my_lemmas.py"
    path.write_text(USER_FILE)
    before = dict(proofs.PROOFS)
    yield path
    proofs.PROOFS.clear()
    proofs.PROOFS.update(before)
    proofs._core._LOADED.pop(path.resolve(), None)


def _check_outcomes(rows: list[dict], K: int) -> None:
    by_key = {r["key"]: r for r in rows}
    assert list(by_key) == ["user_true", "user_false", "user_undecided"]
    assert by_key["user_true"]["status"] == "verified" and by_key["user_true"]["success"]
    false = by_key["user_false"]
    assert false["status"] == "failed" and not false["success"]
    C = int(false["point"]["C"])
    # (1 + 1/C)^2 - (1 + 1/C^2) = 2/C, typed out
    assert float(false["residual"]) == pytest.approx(float(Fraction(2, C)), rel=1e-2)
    und = by_key["user_undecided"]
    assert und["status"] == "undecided" and not und["success"]
    assert f"K = {K} random points" in und["message"]
    assert und["claims"][0]["points"] == K


def test_run_proofs_module(user_file):
    results = proofs.run_proofs(module=user_file, numeric_points=4)
    _check_outcomes([r.as_dict() for r in results], K=4)
    # Loading the same file again neither re-registers nor raises.
    assert [r.key for r in proofs.run_proofs(module=str(user_file))] == [r.key for r in results]


def test_cli_module_json_and_exit_status(user_file, capsys):
    """Exit 1 only because one proof failed; undecided alone exits 0 but is not counted as verified."""
    assert main(["prove", "--module", str(user_file), "--json", "--points", "5"]) == 1
    _check_outcomes(json.loads(capsys.readouterr().out), K=5)
    assert main(["prove", "--module", str(user_file), "user_true", "user_undecided"]) == 0
    out = capsys.readouterr().out
    assert "1/2 verified, 0 failed, 1 undecided" in out


def test_cli_module_latex(user_file, capsys):
    assert main(["prove", "--module", str(user_file), "user_true", "--latex"]) == 0
    assert "$$ C \\left(1 - \\frac{1}{C}\\right) = C - 1 $$" in capsys.readouterr().out
    main(["prove", "--module", str(user_file), "user_true", "--latex", "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["latex"] == ["C \\left(1 - \\frac{1}{C}\\right) = C - 1"]


def test_subprocess_outside_the_repository(user_file):
    """As a user runs it: the ``ufm`` command in another directory, with the file's path."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "ufm", "prove", "--module", user_file.name, "--json"],
        cwd=user_file.parent, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    _check_outcomes(json.loads(done.stdout), K=3)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x = 1\n", "registers no proofs"),
        ("raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
        ("from ufm.proofs import Proof, register\nregister(Proof('etf', 'dup', '', '', lambda rng: []))\n",
         "registered twice"),
    ],
)  # fmt: skip
def test_bad_module_is_a_clear_error(tmp_path, capsys, text, match):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        proofs.run_proofs(module=path)
    assert main(["prove", "--module", str(path)]) == 2
    assert "ufm prove: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"missing\.py' does not exist$"):
        proofs.run_proofs(module=tmp_path / "missing.py")
    (tmp_path / "notes.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a \.py file$"):
        proofs.run_proofs(module=tmp_path / "notes.txt")


def test_check_must_return_claims():
    bad = proofs.Proof("bad_return", "returns a number", "test", "none", lambda rng: 0)
    with pytest.raises(ValueError, match="must return a list of Claim"):
        proofs.verify(bad)


def test_decorator_and_object_forms_register_the_same(monkeypatch):
    monkeypatch.setattr(proofs._core, "PROOFS", dict(proofs.PROOFS))

    @proofs.register("deco", "decorated", "test", "none")
    def check(rng):
        return [proofs.zero("1 = 1", 1, 1)]

    assert proofs._core.PROOFS["deco"].check is check
    obj = proofs.register(proofs.Proof("obj", "object", "test", "none", check))
    assert proofs._core.PROOFS["obj"] is obj
    with pytest.raises(ValueError, match="without spaces"):
        proofs.Proof("two words", "", "", "", check)


def test_the_public_api_is_exported():
    for name in ("Proof", "Claim", "zero", "positive", "numeric", "register", "verify", "run_proofs",
                 "IJ", "C", "N", "C_GE2", "alpha", "lam"):  # fmt: skip
        assert name in proofs.__all__ and hasattr(proofs, name), name
