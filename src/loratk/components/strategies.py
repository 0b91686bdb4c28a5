"""The strategies of a run from its recipe: the adapter (what trains), the denoiser (the shared denoising
step) and the objective (how the loss is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratk.recipe import Recipe


def load_recipe_model(recipe: Recipe, path: str | None = None) -> Any:
    """The recipe's base model (its VAE, revision, variant), fp32 on the CPU; `path`: a checkpoint of the same
    model instead (an epoch's full single file), read with the base model's configs."""
    from loratk.models.family import family_for_model, load_model

    cfg = recipe.model
    family = family_for_model(
        cfg.path, cfg.family, single_file_config=cfg.single_file_config, revision=cfg.revision
    )
    if path is not None:
        return load_model(family, path, vae=cfg.vae, single_file_config=cfg.single_file_config or cfg.path)
    return load_model(
        family,
        cfg.path,
        vae=cfg.vae,
        revision=cfg.revision,
        variant=cfg.variant,
        single_file_config=cfg.single_file_config,
    )


def build_lora_adapter(recipe: Recipe) -> Any:
    from loratk.adapters.lora import LoraAdapter

    return LoraAdapter(
        rank=recipe.lora.rank,
        alpha=recipe.lora.scale_alpha,
        dropout=recipe.lora.dropout,
        init=recipe.lora.init,
        targets=recipe.lora.targets,
        train_text_encoders=recipe.lora.train_text_encoders,
        text_encoder_lr=recipe.text_encoder_lr,
        export_dtype=recipe.export.dtype,
        export_diffusers=recipe.export.diffusers,
    )


def build_full_adapter(recipe: Recipe) -> Any:
    from loratk.adapters.full import FullAdapter

    return FullAdapter(
        train_text_encoders=recipe.full.train_text_encoders,
        text_encoder_lr=recipe.text_encoder_lr,
        export_dtype=recipe.export.dtype,
        extract_lora_rank=recipe.export.extract_lora_rank,
        lora_targets=recipe.lora.targets,
    )


def build_adapter(recipe: Recipe) -> Any:
    from loratk.components.methods import method_of

    return method_of(recipe).build_adapter(recipe)


def build_denoiser(recipe: Recipe, model: Any, *, device: Any, weight_dtype: Any) -> Any:
    """The denoising step over the (prepared) model parts, with the recipe's loss options."""
    from loratk.components.methods import method_of
    from loratk.objectives.denoising import Denoiser

    return Denoiser(
        model,
        device=device,
        weight_dtype=weight_dtype,
        prediction_type=recipe.model.prediction_type,
        noise_offset=recipe.train.noise_offset,
        min_snr_gamma=recipe.train.min_snr_gamma,
        train_text_encoders=method_of(recipe).trains_text_encoders(recipe),
    )


def build_caption_objective(recipe: Recipe, denoiser: Any) -> Any:
    from loratk.objectives.caption import CaptionObjective

    return CaptionObjective(denoiser)


def build_dreambooth_objective(recipe: Recipe, denoiser: Any) -> Any:
    from loratk.objectives.dreambooth import DreamBoothObjective

    return DreamBoothObjective(denoiser, prior_loss_weight=recipe.dreambooth.prior_loss_weight)
