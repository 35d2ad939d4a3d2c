"""``specs-jax`` command line: one sub-command per concern, each defined in its own module."""

from __future__ import annotations

import argparse
import sys

from specs_jax.cli import convert, data, generate, init, pipeline, train
from specs_jax.cli import eval as eval_cmd

COMMANDS = (init, convert, generate, train, data, pipeline, eval_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specs-jax",
        description="Post-train Qwen2.5-VL in JAX with SPECS and on-policy self-distillation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"specs-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
