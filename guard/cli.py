"""The `memguard` command line.

Each command group lives beside the code it drives and exposes `register(subparsers)`; this
module only lists the groups, parses, and turns expected failures (MemGuardError) into a one-line
message and exit status 2 instead of a traceback. Groups are imported by name so the library never
imports the server package (imports flow server → guard → kernels).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from memguard.errors import MemGuardError

# module paths whose `register(subparsers)` adds commands
COMMAND_GROUPS = (
    "memguard.testbed.cli",
    "memguard.audit",
)
OPTIONAL_GROUPS = (  # groups that land in later issues; absent modules are skipped
    "memguard.index.cli",
    "memguard.generate_cli",
    "memguard.server.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memguard", description="Generation-time memorization guard")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_GROUPS + OPTIONAL_GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name in OPTIONAL_GROUPS and exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MemGuardError as exc:
        print(f"memguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
