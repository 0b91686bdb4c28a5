"""`loratk <command>`: parse arguments, lazy-import the handler, turn errors into exit codes.

Heavy libraries (torch, diffusers, transformers) load inside the command that needs them, so `loratk --help`
is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loratk import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from loratk.train import main as train_main

    return train_main([args.recipe, *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratk",
        description="Fine-tune Stable Diffusion XL into small character and style adapters.",
        epilog="Multi-GPU / mixed precision: accelerate launch -m loratk.train RECIPE.toml",
    )
    parser.add_argument("--version", action="version", version=f"loratk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter from a TOML recipe (single process)")
    train.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value")
    train.set_defaults(handler=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
