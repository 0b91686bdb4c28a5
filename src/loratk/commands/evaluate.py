"""`loratk eval RUN`: render what is missing and score the base model and every epoch of a run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="score a run's epochs (CLIP-T, CLIP-I, DINO, KID, FID, IS, PSNR/SSIM) and rebuild report.html",
        description="Read RUN/recipe.resolved.toml, render the [sample], [eval] and leak prompts for the base "
        "model and each epochN.safetensors where the images are missing (a PNG rendered with the same "
        "prompt, seed and settings is reused), score them like the training-time evaluation, append the "
        "rows to RUN/eval.jsonl and rebuild RUN/report.html, which names the best epoch. Run it from the "
        "folder training ran in (the recipe's data paths are relative to it). "
        "Exit status: 0 done, 2 an unreadable run folder or bad arguments.",
    )
    evaluate.add_argument("run", metavar="RUN", help="a run folder, e.g. runs/quickstart")
    evaluate.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        metavar="N",
        help="only these epochs (0 = the base model); default: the base model and every epoch file",
    )
    evaluate.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is a GPU)")
    evaluate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loratk.evaluation.best import choose_best_epoch
    from loratk.evaluation.report import REPORT_NAME
    from loratk.evaluation.runs import RunReadError, load_run
    from loratk.models.family import ModelLoadError
    from loratk.run_eval import EvalRunError, evaluate_run, load_run_recipe

    try:
        recipe = load_run_recipe(Path(args.run))
        evaluate_run(args.run, epochs=args.epochs, device=args.device)
        best = choose_best_epoch(load_run(args.run), recipe.eval.best_metric, recipe.eval.best_tolerance)
    except (EvalRunError, RunReadError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if best is not None:
        print(f"best epoch: {best.epoch} ({best.reason})")
    print(f"report: {Path(args.run) / REPORT_NAME}")
    return 0
