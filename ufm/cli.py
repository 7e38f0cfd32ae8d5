"""Command-line interface: a thin layer over the public API.

Every subcommand parses its flags, calls one library function, and prints either a readable table
or (with ``--json``) one JSON object. A bad input raises ValueError in the library; the CLI turns it
into a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

# Each entry adds one subcommand to the parser and sets ``run`` to its handler.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator: add a subcommand registration function to the CLI."""
    _COMMANDS.append(register)
    return register


def print_json(obj) -> None:
    """Print one JSON object on one line (NaN is not valid JSON, so it is refused)."""
    print(json.dumps(obj, allow_nan=False, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ufm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ufm`` console script and ``python -m ufm``."""
    from . import commands  # noqa: F401  (registers the subcommands)

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as err:
        print(f"ufm {args.command}: error: {err}", file=sys.stderr)
        return 2
