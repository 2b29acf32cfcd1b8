"""``cbam-dsa``: thin subcommands over the library.

Each subcommand lives in its own module (:mod:`.demo`, :mod:`.bench`, :mod:`.export`, :mod:`.visualize`), which
exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Those modules import heavy
dependencies inside ``run`` only, so ``--help`` stays fast. A user mistake raises :class:`.errors.UserError` and ends
with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import UserError  # also re-exported: the demo's command imports it from here

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

# name -> module implementing it
COMMANDS: dict[str, str] = {
    "demo": "cbam_dsa.cli.demo",
    "visualize": "cbam_dsa.cli.visualize",
    "bench": "cbam_dsa.cli.bench",
    "export": "cbam_dsa.cli.export",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The argument parser with every subcommand, and the modules behind them."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="cbam-dsa",
        description="CBAM with fused channel attention, dynamic spatial attention and a residual blend.",
    )
    parser.add_argument("--version", action="version", version=f"cbam-dsa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {name: importlib.import_module(module_name) for name, module_name in COMMANDS.items()}
    for name, module in modules.items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cbam-dsa`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as error:
        print(f"cbam-dsa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbam-dsa {args.command}: interrupted", file=sys.stderr)
        return 130
