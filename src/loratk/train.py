"""`python -m loratk.train RECIPE.toml [section.key=value ...]` (and `loratk train`): the entry point only.

Parse the command line, load the recipe, run it (`loratk.run`), and turn errors into exit codes.
Several GPUs: `accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m loratk.train RECIPE.toml`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loratk.recipe import RecipeError, load_recipe


def build_parser(prog: str = "python -m loratk.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train an SDXL adapter from a TOML recipe. Options and overrides go in any order.",
        epilog="example: loratk train recipes/ukiyoe.toml train.epochs=3 lora.rank=64 --overwrite",
    )
    parser.add_argument("recipe", help="path to a TOML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value (TOML values)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="STATE",
        help="continue from the newest complete state (default), or from the given state folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: delete this run's states, metrics and adapter files",
    )
    return parser


def parse_args(argv: Sequence[str] | None, prog: str = "python -m loratk.train") -> argparse.Namespace:
    """Options and `section.key=value` overrides in any order (`RECIPE --overwrite train.epochs=1`)."""
    return build_parser(prog).parse_intermixed_args(argv)


LAUNCHERS = ("accelerate", "torchrun")


def _parent_command() -> list[str]:
    """The command line of the process that started this one ([] where it cannot be read)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def launcher_command() -> list[str] | None:
    """`accelerate launch ...` / `torchrun ...` as typed, when one of them started this process."""
    parent = _parent_command()
    for i, part in enumerate(parent):
        name = Path(part).name
        if name in LAUNCHERS or (name == "-m" and parent[i + 1 : i + 2] == ["torch.distributed.run"]):
            return [name if name in LAUNCHERS else "torchrun", *parent[i + (1 if name in LAUNCHERS else 2) :]]
    return None


def rerun_command(prog: str, argv: Sequence[str]) -> str:
    """The command to type again to resume: the launcher's when there is one, else this one; quoted."""
    import shlex

    launched = launcher_command()
    return shlex.join(launched) if launched else " ".join([prog, shlex.join(argv)]).strip()


def main(argv: Sequence[str] | None = None, prog: str = "python -m loratk.train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={json.dumps(args.resume)}")
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from loratk.logs import configure_logging

    configure_logging()
    from loratk.components.launch import LaunchError
    from loratk.core.checkpoint import StateError
    from loratk.core.interrupts import StopRequest, TrainingInterrupted, stop_when_parent_exits
    from loratk.core.loop import NonFiniteLossError
    from loratk.data.cache import CacheError
    from loratk.data.dataset import DataError
    from loratk.files import OutputWriteError
    from loratk.models.family import ModelLoadError
    from loratk.prompts import PromptError
    from loratk.run import train
    from loratk.run_folder import RunDirError

    if launcher_command() is not None:
        # A launcher killed on its own (`docker stop`, `kill PID`) must not leave the trainer running on.
        stop_when_parent_exits()
    resume_cmd = rerun_command(prog, argv)
    try:
        with StopRequest() as stop:
            train(recipe, overwrite=args.overwrite, stop=stop)
    except (
        DataError,
        CacheError,
        ModelLoadError,
        PromptError,
        RunDirError,
        LaunchError,
        StateError,
        ImportError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"{err.signal_name}: {err}. Resume with:\n  {resume_cmd}", file=sys.stderr)
        return err.exit_code
    except (NonFiniteLossError, OutputWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"aborted (second Ctrl-C); the newest complete state can be resumed with:\n  {resume_cmd}",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
