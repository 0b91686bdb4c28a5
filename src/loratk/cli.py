"""`loratk <command>`: parse arguments, lazy-import the handler, turn errors into exit codes.

Heavy libraries (torch, diffusers, transformers) load inside the command that needs them, so `loratk --help`
is instant. `train` has its own parser (`loratk.train`); the others live in `loratk.commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loratk import __version__
from loratk.commands import caption, check, compare, evaluate, plan, sample


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratk",
        description="Fine-tune Stable Diffusion XL into small character and style adapters.",
        epilog="Several GPUs: accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m loratk.train "
        "RECIPE.toml",
    )
    parser.add_argument("--version", action="version", version=f"loratk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "train",
        help="train an adapter from a TOML recipe in this process (`loratk train RECIPE --help` for options)",
        add_help=False,
    )
    for command in (caption, sample, check, evaluate, compare, plan):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser: the same options as `python -m loratk.train`
        from loratk.train import main as train_main

        return train_main(argv[1:], prog="loratk train")
    parser = build_parser()
    commands = {name: sub for name, sub in _subparsers(parser).items() if name != "train"}
    if argv[:1] and argv[0] in commands:
        # Options and positionals (a recipe's overrides) in any order: `check r.toml --report x a.b=1`.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
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
