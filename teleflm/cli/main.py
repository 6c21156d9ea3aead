"""The `teleflm` command. Each subcommand lives in its own module with `add_parser(subparsers)`,
which registers the parser and sets `func` to the function that runs it."""

import argparse
import importlib
import sys

from teleflm.train.stability import SpikeStop

# Subcommand modules, in the order `teleflm --help` lists them.
SUBCOMMANDS = [
    "teleflm.cli.demo",
    "teleflm.cli.tokenizer",
    "teleflm.cli.data",
    "teleflm.cli.export",
    "teleflm.cli.generate",
    "teleflm.cli.serve",
    "teleflm.cli.embed",
    "teleflm.cli.pretrain",
    "teleflm.cli.grow",
    "teleflm.cli.eval",
    "teleflm.cli.plan",
    "teleflm.cli.mup",
    "teleflm.cli.predict",
    "teleflm.cli.recipe",
    "teleflm.cli.sft",
    "teleflm.cli.dpo",
    "teleflm.cli.chat",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of `command` alone when it names one: each command's
    module is imported to build its parser, and some import torch."""
    parser = argparse.ArgumentParser(prog="teleflm", description=__import__("teleflm").__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [m for m in SUBCOMMANDS if m == f"teleflm.cli.{command}"] or SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:
        # User errors: a clear one-line message, no traceback.
        print(f"teleflm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SpikeStop as e:  # the run stopped itself; its checkpoints and logs are kept
        print(f"teleflm {args.command}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
