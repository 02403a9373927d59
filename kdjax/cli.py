"""The ``kdjax`` command: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdjax", description="Knowledge distillation for semantic segmentation in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="distil random teacher maps into random student maps with every loss")
    demo.add_argument("--steps", type=int, default=60, help="gradient steps per loss")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the maps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from kdjax import demo
        demo.run(steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
