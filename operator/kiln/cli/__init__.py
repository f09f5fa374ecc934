"""The ``kiln`` command. Each sub-module adds its sub-commands with ``add_parser(subparsers)``.

Sub-commands set ``func(args) -> int`` (the exit code) on their parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules under kiln.cli that contribute sub-commands, in help order.
MODULES = ("operator", "crds", "registry", "artifact", "features")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Kiln: train, register and serve models on Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in MODULES:
        try:
            mod = importlib.import_module(f"kiln.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"kiln.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kiln``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
