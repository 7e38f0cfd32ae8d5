"""Benchmark: start-up of the CLI against ``python -c "import numpy"``, the floor of any NumPy program.

Each command runs in a fresh interpreter, ``--repeats`` times, interleaved (so a burst of load on a
shared machine hits every command alike); the table shows the median wall time and its ratio to the
median of ``import numpy``. Target (issue 19): ``ufm solve --json`` within 2x of ``import numpy``.
``ufm metrics`` computes with torch, so its floor is ``import torch``, shown for comparison.

Usage: python benchmarks/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOLVE = ["solve", "-C", "10", "-N", "100", "-p", "64", "--lam-w", "5e-4", "--lam-h", "5e-4", "--json"]


def _commands(features: str) -> dict[str, list[str]]:
    ufm = [sys.executable, "-m", "ufm"]
    return {
        "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "ufm --help": [*ufm, "--help"],
        "ufm solve --json": [*ufm, *SOLVE],
        "closed form by hand": [
            sys.executable, "-c",
            "import json; from ufm.closed_form import ufm_optimum; "
            "print(json.dumps(ufm_optimum(10, 100, 5e-4, 5e-4).as_dict()))",
        ],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "ufm metrics FILE.npz": [*ufm, "metrics", features],
    }  # fmt: skip


def _time(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        features = str(Path(tmp) / "features.npz")
        rng = np.random.default_rng(0)
        np.savez(features, features=rng.standard_normal((1000, 16)), labels=np.arange(1000) % 4)
        commands = _commands(features)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for cmd in commands.values():  # warm the file cache once
            _time(cmd)
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_time(cmd))
    base = statistics.median(times["python -c 'import numpy'"])
    print(f"# start-up, median of {args.repeats} fresh interpreters (min..max in brackets)")
    print(f"{'command':<28} {'median s':>9} {'x numpy':>8}   range s")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {med:>9.3f} {med / base:>8.2f}   [{min(ts):.3f}..{max(ts):.3f}]")


if __name__ == "__main__":
    main()
