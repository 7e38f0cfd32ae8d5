"""Every reference to docs/theory.md in the code, the proofs and the README names a section that
exists there (docs/theory.md is the project's own theory document; users have no other)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"docs/theory\.md,? §(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)


def test_every_theory_reference_resolves():
    sections = set(HEADING.findall((ROOT / "docs" / "theory.md").read_text()))
    files = [
        *ROOT.glob("ufm/**/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("benchmarks/*"),
        ROOT / "README.md",
    ]
    cited = {}
    for path in files:
        for number in REFERENCE.findall(path.read_text()):
            cited.setdefault(number, path.relative_to(ROOT))
    assert cited, "no references found: the pattern is wrong"
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"references to sections that docs/theory.md lacks: {missing}"


def test_no_reference_to_files_outside_the_repository():
    """THEORY.md and PEERS.md were the developers' notes; users have only docs/theory.md."""
    shipped = ("ufm/**/*.py", "benchmarks/*", "examples/*", "docs/*.md", "docs/*.rst", "docs/*.py")
    for path in [*(p for pattern in shipped for p in ROOT.glob(pattern)), ROOT / "README.md"]:
        text = path.read_text()
        assert not any(s in text for s in ("THEORY.md", "PEERS.md", "/work/shared")), path
