"""`loratk check FOLDER|RECIPE`: bad images, captions, buckets and duplicates, before any model loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loratk.commands.arguments import image_size
from loratk.commands.caption import CAPTION_MANIFESTS

_FOLDER_OPTIONS = (
    "resolution",
    "min_side",
    "caption_ext",
    "manifest",
    "trigger",
    "bucket_step",
    "no_buckets",
)
FOLDER_REPORTS = Path("runs") / "check"  # a folder's CSV report: runs/check/<folder>.csv (git ignores runs/)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        help="per-image CSV (default: <run dir>/check.csv for a recipe, runs/check/<folder>.csv for a folder)",
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
        "--resolution", type=image_size, metavar="W[xH]", help="training size / bucket area (1024)"
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
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
        from loratk.components.data import build_data_spec
        from loratk.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(target, args.overrides)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        from loratk.components.methods import method_of

        method = method_of(recipe)
        spec = (method.data_spec or build_data_spec)(recipe)
        reads_captions = method.reads_captions
        default_csv = recipe.run_dir / "check.csv"
    elif target.is_dir():
        reads_captions = True
        if args.overrides:
            print(
                f"error: overrides ({' '.join(args.overrides)}) apply to a recipe, not a folder",
                file=sys.stderr,
            )
            return 2
        from loratk.components.data import build_folder_spec

        spec, notes = build_folder_spec(
            target,
            resolution=args.resolution,
            min_side=args.min_side,
            caption_ext=args.caption_ext,
            manifest=args.manifest,
            trigger=args.trigger,
            bucket_step=args.bucket_step,
            buckets=not args.no_buckets,
            manifests=CAPTION_MANIFESTS,
        )
        for note in notes:
            print(note)
        default_csv = FOLDER_REPORTS / f"{target.resolve().name}.csv"
    else:
        print(f"error: {target}: no such folder or .toml recipe", file=sys.stderr)
        return 2

    from loratk.data.check import run_preflight
    from loratk.data.check_report import (
        drop_caption_problems,
        format_summary,
        quarantine_bad_images,
        write_report_csv,
    )

    report = run_preflight(
        spec,
        perceptual_hash=not args.no_duplicates,
        max_distance=args.dup_distance,
        progress=sys.stderr.isatty(),
    )
    if not reads_captions:
        drop_caption_problems(report)
    moved = []
    if args.quarantine:
        moved = quarantine_bad_images(report, Path(args.quarantine))
    csv_path = Path(args.report) if args.report else default_csv
    write_report_csv(report.images, csv_path)
    print(format_summary(report, csv_path=csv_path, quarantined=bool(moved)))
    too_small = any(p.kind == "too_small" for image in report.bad for p in image.problems)
    if target.is_dir() and too_small and not (args.resolution or args.min_side):
        side = spec.resolution[0]
        print(
            f"Hint: with no --resolution, a folder is checked for training at {side}x{side} (SDXL's size), "
            f"where images under {spec.effective_min_side} px are too small. For a smaller training size pass "
            "it, e.g. --resolution 512 for SD 1.x (or --min-side PX), or check the recipe you train with: "
            "loratk check recipes/NAME.toml"
        )
    remaining = len(report.problems) + sum(1 for r in report.bad if not r.moved_to)
    if moved:
        print(f"Quarantine: moved {len(moved)} file(s) to {args.quarantine} (nothing was deleted).")
        print(f"Remaining errors after the move: {remaining}.")
    return 1 if remaining else 0
