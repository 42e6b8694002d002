"""The ``chash`` command."""

from __future__ import annotations

import argparse
import sys

from chashd import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chash``."""
    parser = argparse.ArgumentParser(prog="chash", description="Talk to a chashd cluster.")
    parser.add_argument("--version", action="version", version=f"chash {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``chash``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0  # pragma: no cover - every subcommand returns its own status


if __name__ == "__main__":
    sys.exit(main())
