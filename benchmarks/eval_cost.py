"""Evaluation cost per epoch, as a share of the epoch's training time.

    python benchmarks/eval_cost.py                                   # CPU: the quickstart (tiny models)
    python benchmarks/eval_cost.py --recipe recipes/ukiyoe.toml --epochs 2 data.dir=...   # GPU: the seed recipe

Trains the recipe twice from scratch in a temporary folder, the same seed both times: once with the image
metrics off (`eval.every_n_epochs = 0`) and once with them every epoch. The difference of the epoch times
(`time/epoch_s` in metrics.jsonl, which covers training, export, samples and the epoch hooks) is what the
evaluation adds: rendering the leak and `[eval]` prompts, loading the evaluators and scoring. Also printed:
the scoring time alone (`time_s` of eval.jsonl) and the validation loss's share (on in both runs). The goal on
a GPU for the seed recipe's sample set: evaluation <= 10% of the epoch's training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(recipe_path: str, overrides: list[str], out: Path) -> tuple[Path, float]:
    from loratk.recipe import load_recipe
    from loratk.run import train

    recipe = load_recipe(recipe_path, [*overrides, f"output_dir={out}"])
    started = time.perf_counter()
    run_dir = train(recipe)
    return run_dir, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    common = [f"train.epochs={args.epochs}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        # A first run warms the model, feature and latent caches, so neither timed run pays for them.
        _train(args.recipe, common, Path(tmp) / "warm")
        off, off_total = _train(args.recipe, [*common, "eval.every_n_epochs=0"], Path(tmp) / "off")
        on, on_total = _train(args.recipe, [*common, "eval.every_n_epochs=1"], Path(tmp) / "on")
        epoch_off = [r["time/epoch_s"] for r in _rows(off / "metrics.jsonl") if "time/epoch_s" in r]
        epoch_on = [r["time/epoch_s"] for r in _rows(on / "metrics.jsonl") if "time/epoch_s" in r]
        scoring = [r["time_s"] for r in _rows(on / "eval.jsonl") if r["epoch"] > 0]
    train_s = statistics.median(epoch_off)
    added = statistics.median(on_ - off_ for on_, off_ in zip(epoch_on, epoch_off, strict=True))
    print(f"recipe {args.recipe}, {args.epochs} epochs, medians over epochs")
    print(f"  epoch without image metrics: {train_s:.2f} s")
    print(f"  epoch with image metrics:    {statistics.median(epoch_on):.2f} s")
    print(f"  evaluation added per epoch:  {added:.2f} s = {100 * added / train_s:.0f}% of the epoch")
    print(f"  of which scoring:            {statistics.median(scoring):.2f} s")
    print(f"  whole runs: {off_total:.1f} s without, {on_total:.1f} s with (incl. the base model's scores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
