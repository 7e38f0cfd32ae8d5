"""Every example in examples/ runs (in its fast mode), and the README's snippets run as written.

Each example is run the way a user runs it: a fresh ``python`` process in another directory, with
``ufm`` importable; its printed output is checked against what the example's docstring promises.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ufm.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_every_example_is_tested():
    """A new example must be added here (or it would silently not run in the tests)."""
    tested = {"verify_my_lemma.py", "simulate_variant_flow.py", "measure_my_torch_model.py",
              "test_my_properties.py", "flow_vs_closed_form.py", "sweep_flow.toml"}  # fmt: skip
    assert {p.name for p in EXAMPLES.iterdir() if p.is_file()} == tested


def test_verify_my_lemma(tmp_path):
    """The three outcomes, from Python and from ``ufm prove --module`` (exit 1: one proof failed)."""
    done = _run([str(EXAMPLES / "verify_my_lemma.py")], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.startswith("my_")}
    assert lines == {"my_centring": "verified", "my_wrong_cosine": "failed", "my_loss_positive": "undecided"}
    # The counterexample's residual is -1/(C-1) + 1/C = -1/(C(C-1)).
    C, residual = re.search(r"counterexample \{'C': '(\d+)'\}, residual (\S+)", done.stdout).groups()
    assert float(residual) == pytest.approx(-1 / (int(C) * (int(C) - 1)), rel=1e-2)
    cli = _run(["-m", "ufm", "prove", "--module", str(EXAMPLES / "verify_my_lemma.py")], tmp_path)
    assert cli.returncode == 1 and "1/3 verified, 1 failed, 1 undecided" in cli.stdout, cli.stderr


def test_simulate_variant_flow(tmp_path):
    done = _run([str(EXAMPLES / "simulate_variant_flow.py"), "--quick", "--out", "figs"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "figs" / "variant_flows.png").stat().st_size > 10_000
    for variant in ("balanced square loss", "deep linear", "cross-entropy", "imbalanced"):
        assert variant in done.stdout
    assert done.stdout.count("closed form loss") == 4  # each variant has one (docs/theory.md §5, §7-§9)


def test_measure_my_torch_model(tmp_path):
    """Both layers are measured; the W-dependent NC3 is absent ('-') only at the wider hidden layer."""
    done = _run([str(EXAMPLES / "measure_my_torch_model.py"), "--quick"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert rows["nc3"][1] == "-" and rows["nc3"][0] != "-"
    assert all(v != "-" for v in rows["nc1"]) and float(rows["nc1"][0]) >= 0


def test_property_test_file_runs_on_its_own(tmp_path):
    """The hypothesis file uses only ufm.testing (no conftest of ours): it runs under plain pytest."""
    done = _run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_my_properties.py")], tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_flow_vs_closed_form(tmp_path):
    done = _run([str(EXAMPLES / "flow_vs_closed_form.py")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("reached: True") == 2 and "no closed form" in done.stdout


def test_sweep_example_config_is_valid():
    """The sweep example is a configuration, not a script: it parses and expands to its 32 runs."""
    from ufm.experiments.sweep import expand_grid, load_config

    config, _ = load_config(EXAMPLES / "sweep_flow.toml")
    assert len(expand_grid(config)) == 32


def test_readme_python_snippets_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "no python snippet found in README.md"
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(blocks))
    done = _run([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr


# README shell lines that the tests do not run, with the reason: installation, the test suite
# itself, and the full job (tests/test_reproduce.py runs its quick mode).
NOT_RUN = ("python", "pip", ".", "pytest", "ufm reproduce")


def test_readme_ufm_commands_run_as_written(capsys):
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith(NOT_RUN)
    ]
    assert lines, "no ufm command found in README.md"
    for line in lines:
        argv = shlex.split(line, comments=True)  # as a shell reads it: "# ..." is a comment
        assert argv[0] == "ufm", line
        assert main(argv[1:]) == 0, line
