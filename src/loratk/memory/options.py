"""The memory options a recipe does not use yet, each with its predicted peak: what `loratk plan` offers
when a recipe does not fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratk.memory.estimate import MemoryEstimate, estimate_step

if TYPE_CHECKING:
    from loratk.recipe import Recipe


@dataclass(frozen=True)
class MemoryOption:
    override: str  # e.g. "train.gradient_checkpointing=true", as `loratk plan` / `loratk train` take it
    peak_bytes: float  # predicted peak at the recipe's batch with this option (margin not included)
    note: str = ""


def memory_options(
    recipe: Recipe, estimate: MemoryEstimate, batch_size: int, *, device_type: str = "cuda"
) -> list[MemoryOption]:
    """Each memory option the recipe does not use yet, with its predicted peak at `batch_size`: one step
    each on fake tensors, except the 8-bit optimizer (bitsandbytes cannot run on fake tensors), whose
    saving is computed from the optimizer state (8-bit AdamW keeps 2 bytes per weight instead of 8)."""
    train, optim = recipe.train, recipe.optim
    candidates: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if not train.gradient_checkpointing:
        candidates.append(("train.gradient_checkpointing=true", {"train": {"gradient_checkpointing": True}}))
    accumulation = train.gradient_accumulation_steps == 1 and train.global_batch_size is None
    if not optim.fused_backward and accumulation:
        candidates.append(("optim.fused_backward=true", {"optim": {"fused_backward": True}}))
    if optim.name == "adamw":
        candidates.append(("optim.name=adafactor", {"optim": {"name": "adafactor"}}))
    if train.mixed_precision == "no":
        candidates.append(("train.mixed_precision=bf16", {"train": {"mixed_precision": "bf16"}}))
    if not (recipe.data.cache_latents and recipe.data.cache_text_embeddings) and recipe.dreambooth is None:
        # With both caches the VAE and the frozen text encoders leave the card during training.
        candidates.append(
            (
                "data.cache_latents=true data.cache_text_embeddings=true",
                {"data": {"cache_latents": True, "cache_text_embeddings": True}},
            )
        )
    options = []
    for override, update in candidates:
        changed = _updated(recipe, update)
        peak = estimate_step(changed, batch_size, device_type=device_type).peak.total
        options.append(MemoryOption(override, peak))
    if optim.name == "adamw":
        first = estimate.points[0].peak
        saving = first.by_category["optimizer"] * 0.75
        options.append(
            MemoryOption(
                "optim.name=adamw8bit", estimate.peak_bytes(batch_size) - saving, "needs loratk[bnb]"
            )
        )
    return sorted(options, key=lambda o: o.peak_bytes)


def _updated(recipe: Recipe, update: dict[str, dict[str, Any]]) -> Recipe:
    sections = {name: getattr(recipe, name).model_copy(update=values) for name, values in update.items()}
    return recipe.model_copy(update=sections)
