"""`loratk compare RUN RUN ...`: what each run cost and how its best epoch scored, as a table, and a grid of
their samples, in `--out` (compare.html, compare.png)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMPARE_DIR = Path("runs") / "compare"


def add_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare",
        help="compare runs: file size, training time, memory, best epoch and its metrics, a sample grid",
        description="Read two or more run folders (finished or still training) and print one row per run: "
        "method, final file size, training time, peak memory, the best epoch and its metrics. Writes "
        "OUT/compare.html and OUT/compare.png (one row of samples per run: its best epoch, else its last "
        "sampled epoch; the images every run rendered with the same prompt and seed). "
        "Exit status: 0 done, 2 bad arguments or an unreadable run folder.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders, e.g. runs/lora-a runs/db-b")
    compare.add_argument(
        "--out",
        default=str(COMPARE_DIR),
        metavar="DIR",
        help="where compare.html/.png go (default %(default)s)",
    )
    compare.add_argument(
        "--metric",
        default="auto",
        help="choose each run's best epoch by this metric (dino, clip_i, kid, val/loss ...; its direction "
        "comes from the metric table) instead of the auto rule: the highest DINO (else CLIP-I) among epochs "
        "whose CLIP-T stays within --tolerance of the base model's, else the lowest val loss (default auto)",
    )
    compare.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="auto rule: how far CLIP-T may fall below the base model's (default %(default)s)",
    )
    compare.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loratk.evaluation.compare import compare_runs, format_table, write_comparison
    from loratk.evaluation.runs import RunReadError
    from loratk.files import OutputWriteError

    try:
        comparison = compare_runs(args.runs, metric=args.metric, tolerance=args.tolerance)
    except (RunReadError, ValueError) as err:  # CompareError and an unknown metric are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(comparison))
    try:
        html, png = write_comparison(comparison, args.out)
    except OutputWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"written: {html}" + (f", {png}" if png else ""))
    return 0
