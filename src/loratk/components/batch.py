"""`train.batch_size = "auto"`: the largest batch whose predicted peak (see `loratk.memory`) fits the
memory budget, chosen once per run; a resumed run keeps the batch it was started with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tomllib
from accelerate.logging import get_logger

if TYPE_CHECKING:
    from loratk.recipe import Recipe

logger = get_logger(__name__)


def resolve_batch_size(recipe: Recipe, *, overwrite: bool = False) -> Recipe:
    """The recipe with `train.batch_size = "auto"` replaced by a number (any other recipe unchanged):
    the batch of the run being resumed, else the largest that fits `performance.memory_budget` (default:
    the GPU's memory). Raises `LaunchError` when there is no budget to fill or nothing fits."""
    if recipe.train.batch_size != "auto":
        return recipe
    from accelerate import PartialState

    from loratk.components.launch import use_cpu_for_multiprocess_launch

    PartialState(
        cpu=use_cpu_for_multiprocess_launch()
    )  # the run's process state, which the logger needs (the Accelerator comes later)
    previous = recipe.run_dir / "recipe.resolved.toml"
    if not overwrite and recipe.train.resume != "never" and previous.is_file():
        used = tomllib.loads(previous.read_text()).get("train", {}).get("batch_size")
        if isinstance(used, int):
            logger.info(f"train.batch_size = 'auto': {used}, as in {previous}", main_process_only=True)
            return with_batch_size(recipe, used)
    batch, budget = choose_batch_size(recipe)
    logger.info(
        f"train.batch_size = 'auto': {batch}, the largest batch predicted to fit {budget / 2**30:.2f} GiB",
        main_process_only=True,
    )
    return with_batch_size(recipe, batch)


def choose_batch_size(recipe: Recipe) -> tuple[int, int]:
    """(batch, budget in bytes): the largest batch predicted to fit the recipe's memory budget."""
    import torch

    from loratk.components.launch import LaunchError
    from loratk.memory.estimate import NothingFits, estimate_memory
    from loratk.memory.sizes import parse_size

    cuda = torch.cuda.is_available()
    if recipe.performance.memory_budget is not None:
        budget = parse_size(recipe.performance.memory_budget)
    elif cuda:
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        raise LaunchError(
            "train.batch_size = 'auto' fills the GPU's memory, and there is no GPU here: set "
            "performance.memory_budget (e.g. '24GiB'), or a number for train.batch_size"
        )
    try:
        estimate = estimate_memory(recipe, device_type="cuda" if cuda else "cpu", budget_bytes=budget)
    except NothingFits as err:
        raise LaunchError(f"train.batch_size = 'auto': {err}") from None
    batch = estimate.max_batch(budget)
    if batch == 0:
        raise LaunchError(
            f"train.batch_size = 'auto': not even batch 1 fits {budget / 2**30:.2f} GiB (predicted "
            f"{estimate.peak_bytes(1) / 2**30:.2f} GiB before the safety margin); `loratk plan` lists the "
            "memory options that would make it fit"
        )
    return batch, budget


def with_batch_size(recipe: Recipe, batch_size: int) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": batch_size})})
