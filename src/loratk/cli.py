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


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTH or WIDTHxHEIGHT, e.g. 1024 or 600x400, got {text!r}"
        ) from None
    if min(size) < 8 or size[0] % 8 or size[1] % 8:
        raise argparse.ArgumentTypeError(f"sides must be multiples of 8 and >= 8, got {text!r}")
    return size


_FOLDER_OPTIONS = (
    "resolution",
    "min_side",
    "caption_ext",
    "manifest",
    "trigger",
    "bucket_step",
    "no_buckets",
)


def _cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    target = Path(args.path)
    if target.is_file() and target.suffix == ".toml":
        given = [
            f"--{name.replace('_', '-')}"
            for name in _FOLDER_OPTIONS
            if getattr(args, name) not in (None, False)
        ]
        if given:
            print(
                f"error: {', '.join(given)} apply to a folder; for a recipe use overrides (data.min_side=128)",
                file=sys.stderr,
            )
            return 2
        from loratk.recipe import RecipeError, load_recipe
        from loratk.train import build_data_spec

        try:
            recipe = load_recipe(target, args.overrides)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        spec = build_data_spec(recipe)
        default_csv = recipe.run_dir / "check.csv"
    elif target.is_dir():
        if args.overrides:
            print(
                f"error: overrides ({' '.join(args.overrides)}) apply to a recipe, not a folder",
                file=sys.stderr,
            )
            return 2
        from loratk.data.captions import Subset
        from loratk.data.check import DataSpec

        subset = Subset(
            dir=target,
            caption_source="manifest" if args.manifest else "auto",
            manifest=Path(args.manifest) if args.manifest else None,
            caption_ext=args.caption_ext or ".txt",
            trigger=args.trigger,
        )
        spec = DataSpec(
            subsets=(subset,),
            resolution=args.resolution or (1024, 1024),
            buckets=not args.no_buckets,
            bucket_step=args.bucket_step or 64,
            min_side=args.min_side,
        )
        default_csv = Path(f"{target.resolve().name}-check.csv")
    else:
        print(f"error: {target}: no such folder or .toml recipe", file=sys.stderr)
        return 2

    from loratk.data.check import format_summary, quarantine_bad_images, run_preflight, write_report_csv

    report = run_preflight(
        spec,
        perceptual_hash=not args.no_duplicates,
        max_distance=args.dup_distance,
        progress=sys.stderr.isatty(),
    )
    moved = []
    if args.quarantine:
        moved = quarantine_bad_images(report, Path(args.quarantine))
    csv_path = Path(args.report) if args.report else default_csv
    write_report_csv(report.images, csv_path)
    print(format_summary(report, csv_path=csv_path, quarantined=bool(moved)))
    remaining = len(report.problems) + sum(1 for r in report.bad if not r.moved_to)
    if moved:
        print(f"Quarantine: moved {len(moved)} file(s) to {args.quarantine} (nothing was deleted).")
        print(f"Remaining errors after the move: {remaining}.")
    return 1 if remaining else 0


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

    check = sub.add_parser(
        "check",
        help="check training data without loading a model: bad images, captions, buckets, duplicates",
        description="Decode every image and read every caption; print a summary, write a per-image CSV report. "
        "Exit status: 0 no errors, 1 errors in the data, 2 usage error.",
    )
    check.add_argument("path", help="an image folder, or a recipe (.toml) whose [data] section is checked")
    check.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value (recipe only)")
    check.add_argument(
        "--report",
        metavar="CSV",
        help="per-image CSV (default: <run dir>/check.csv for a recipe, ./<folder>-check.csv for a folder)",
    )
    check.add_argument(
        "--quarantine", metavar="DIR", help="move bad images (and their captions) into DIR; never deletes"
    )
    check.add_argument(
        "--dup-distance",
        type=int,
        default=6,
        metavar="BITS",
        help="perceptual-hash distance (0-64) under which images count as near-duplicates (default 6)",
    )
    check.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate search")
    folder = check.add_argument_group("folder options (a recipe sets these in [data])")
    folder.add_argument(
        "--resolution", type=_parse_size, metavar="W[xH]", help="training size / bucket area (1024)"
    )
    folder.add_argument(
        "--min-side", type=int, metavar="PX", help="smaller images are errors (default resolution/4)"
    )
    folder.add_argument("--caption-ext", metavar="EXT", help="sidecar caption extension (.txt)")
    folder.add_argument("--manifest", metavar="JSONL", help="read captions from this captions/<set>.jsonl")
    folder.add_argument("--trigger", help="trigger word put in front of each caption")
    folder.add_argument("--bucket-step", type=int, metavar="PX", help="bucket side step (64)")
    folder.add_argument(
        "--no-buckets", action="store_true", help="one fixed size instead of aspect-ratio buckets"
    )
    check.set_defaults(handler=_cmd_check)
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
