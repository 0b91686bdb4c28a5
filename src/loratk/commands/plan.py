"""`loratk plan RECIPE [key=value ...] [--memory 24GiB]`: the peak training memory of a recipe, predicted on
fake tensors (no GPU, no weights), the largest batch that fits the budget, and what would make it fit; then
the peaks of what runs beside training: class images, samples, the image metrics' evaluators.

Exit status: 0 the recipe fits, 1 it does not at its batch size (a smaller batch or an option does) or a
render or an evaluator does not fit, 2 usage or recipe error, or nothing fits."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="predict a recipe's peak training memory without a GPU, and the largest batch that fits",
        description="Run one training step of the recipe on fake tensors (no memory allocated, no weights "
        "loaded; only the model's configs) and report the peak memory, split by kind, with the batch size "
        "that fits --memory. Exit status: 0 fits, 1 does not fit at its batch size, 2 recipe error or "
        "nothing fits; 1 also when class images, samples or an evaluator would not fit.",
    )
    plan.add_argument("recipe", help="a recipe (.toml)")
    plan.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value")
    plan.add_argument(
        "--memory",
        default=None,
        metavar="SIZE",
        help="the card's memory, e.g. 24GiB, 80GB (default: performance.memory_budget, else 24GiB)",
    )
    plan.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="whose autocast rules to follow (default cuda: norms and softmax in fp32)",
    )
    plan.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loratk.logs import configure_logging
    from loratk.memory.sizes import parse_size

    configure_logging()
    from loratk.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        budget = parse_size(args.memory or recipe.performance.memory_budget or "24GiB")
    except ValueError as err:
        print(f"--memory: {err}", file=sys.stderr)
        return 2
    from loratk.memory.estimate import EstimateError

    try:
        return _report(recipe, args, budget)
    except EstimateError as err:
        print(f"{args.recipe}: {err}", file=sys.stderr)
        return 2


def _report(recipe, args: argparse.Namespace, budget: int) -> int:
    from loratk.components.methods import method_of
    from loratk.memory.estimate import (
        SAFETY_MARGIN_FIXED,
        SAFETY_MARGIN_FRACTION,
        NothingFits,
        estimate_memory,
        with_margin,
    )
    from loratk.memory.options import memory_options
    from loratk.memory.sizes import format_gib
    from loratk.memory.tracker import describe_breakdown

    auto = recipe.train.batch_size == "auto"
    try:
        estimate = estimate_memory(
            recipe,
            device_type=args.device,
            budget_bytes=budget,
            renders=True,
            evaluators=True,
            parallel=True,
        )
    except NothingFits as err:
        print(f"{args.recipe}: {err}", file=sys.stderr)
        return 2
    batch = estimate.points[0].batch_size
    peak = estimate.points[0].peak
    largest = estimate.max_batch(budget)
    print(
        f"{args.recipe}: {method_of(recipe).name} on {recipe.model.path}, {precision_label(recipe)}, "
        f"{'batch auto' if auto else f'batch {batch}'} ({args.device} autocast rules)"
    )
    print(
        f"peak at batch {batch}: {format_gib(peak.total)} ({format_gib(with_margin(peak.total))} with the "
        f"safety margin), in the {peak.phase} pass at {peak.module or '-'}"
    )
    for line in describe_breakdown(peak):
        print(f"  {line}")
    print(
        f"per image: {format_gib(estimate.per_image_bytes)}; fixed: {format_gib(estimate.fixed_bytes)} "
        f"(from batches {estimate.points[0].batch_size} and {estimate.points[1].batch_size})"
    )
    print(
        f"margin: +{SAFETY_MARGIN_FRACTION:.0%} + {format_gib(SAFETY_MARGIN_FIXED)} for what is not modelled "
        "(CUDA context, cuDNN/cuBLAS workspaces, attention kernels' buffers, allocator fragmentation)"
    )
    renders_fit = _print_between_steps(estimate, budget, format_gib, with_margin)
    print(f"estimated in {estimate.seconds:.0f} s")
    if largest == 0:
        print(f"budget {format_gib(budget)}: nothing fits, not even batch 1", file=sys.stderr)
        _print_options(recipe, estimate, 1, budget, args.device, memory_options, format_gib, with_margin)
        return 2
    print(f"budget {format_gib(budget)}: the largest batch that fits is {largest}")
    if auto or with_margin(estimate.peak_bytes(batch)) <= budget:
        print("fits" if not auto else f"train.batch_size = 'auto' would train at batch {largest}")
        return 0 if renders_fit else 1
    print(f"batch {batch} does not fit: set train.batch_size = {largest}, or use a memory option")
    _print_options(recipe, estimate, batch, budget, args.device, memory_options, format_gib, with_margin)
    return 1


def precision_label(recipe) -> str:
    mixed = recipe.train.mixed_precision
    return "fp32" if mixed == "no" else mixed


def _print_between_steps(estimate, budget: int, format_gib, with_margin) -> bool:
    """The renders' and evaluators' peaks (each beside the run's state); False when one does not fit."""
    rows = [
        (r.job.describe(), r.peak, f"lower {r.job.override}") for r in estimate.renders
    ] + [
        (f"evaluator {e.kind} {e.name} ({str(e.dtype).removeprefix('torch.')}, batch {e.batch_size})", e.peak,
         e.note or f"lower eval.batch_size, or set eval.{e.kind} = \"\"")
        for e in estimate.evaluators
    ]  # fmt: skip
    if not rows:
        return True
    print("rendering and evaluation, beside the run's state (the same at any batch size):")
    fits = True
    for what, peak, advice in rows:
        if peak is None:
            print(f"  {what}: not estimated: {advice}")
            continue
        planned = with_margin(peak.total)
        verdict = "fits" if planned <= budget else f"does not fit: {advice}"
        fits = fits and planned <= budget
        print(
            f"  {what}: {format_gib(peak.total)} ({format_gib(planned)} with the margin), "
            f"{peak.phase} at {peak.module or '-'}; {verdict}"
        )
    return fits


def _print_options(recipe, estimate, batch, budget, device, memory_options, format_gib, with_margin) -> None:
    options = memory_options(recipe, estimate, batch, device_type=device)
    if not options:
        print("no memory option is left to turn on")
        return
    print(f"memory options at batch {batch} (predicted peak, with the margin):")
    for option in options:
        verdict = "fits" if with_margin(option.peak_bytes) <= budget else "does not fit"
        note = f"; {option.note}" if option.note else ""
        print(f"  {option.override:<56} {format_gib(with_margin(option.peak_bytes)):>10}  {verdict}{note}")
