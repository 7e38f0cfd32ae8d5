"""Command-line interface: a thin layer over the public API.

Every subcommand parses its flags, calls one library function, and prints either a readable table
or (with ``--json``) one JSON object. A bad input raises ValueError in the library; the CLI turns it
into a one-line message on stderr and exit status 2. The subcommands live in ``ufm.commands``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import commands


def build_parser() -> argparse.ArgumentParser:
    """The ``ufm`` parser, one subparser per entry of ``ufm.commands.COMMANDS`` (imports no torch,
    SymPy or SciPy)."""
    parser = argparse.ArgumentParser(prog="ufm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ufm`` console script and ``python -m ufm``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as err:
        print(f"ufm {args.command}: error: {err}", file=sys.stderr)
        return 2
