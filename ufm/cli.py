"""Command-line interface: a thin layer over the public API.

Every subcommand parses its flags, calls one library function, and prints either a readable table
or (with ``--json``) one JSON object. A bad input raises ValueError in the library; the CLI turns it
into a one-line message on stderr and exit status 2. The subcommands live in ``ufm.commands``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    """The ``ufm`` parser, one subparser per entry of ``ufm.commands.COMMANDS`` (imports no torch,
    SymPy or SciPy)."""
    parser = argparse.ArgumentParser(prog="ufm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ufm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands.COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ufm`` console script and ``python -m ufm``."""
    args = build_parser().parse_args(argv)
    try:
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; status 128 + SIGINT, as ufm sweep's
        hint = getattr(args, "on_interrupt", None)
        print(f"\nufm {args.command}: interrupted" + (f"; {hint(args)}" if hint else ""), file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"ufm {args.command}: error: {err}", file=sys.stderr)
        return 2


def _closed_pipe() -> int:
    """The reader of stdout went away (``ufm prove | head``): end quietly, with status 1 (the output
    was cut short), as the Python documentation's note on SIGPIPE does. stdout is pointed at devnull
    so that the interpreter's final flush raises nothing either."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
