"""The `shine` command line: one argparse subcommand per tool.

A subcommand is a module with HELP, add_arguments(parser) and run(args) -> exit status; adding
one is an import and an entry in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import bench
from .arena import command as arena

SUBCOMMANDS = {"arena": arena, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    """The parser of `shine` and all its subcommands."""
    parser = argparse.ArgumentParser(prog="shine", description="MARS, CAME and Cautious optimizers for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shine` console script and of `python -m shine`; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)
