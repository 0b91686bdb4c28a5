"""The latent and text-embedding caches of a run: whether they apply, and filling them before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.logging import get_logger

if TYPE_CHECKING:
    from loratk.recipe import Recipe

logger = get_logger(__name__)


def text_cache_off_reason(recipe: Recipe) -> str | None:
    """Why text embeddings cannot be cached for this recipe, or None if they can."""
    from loratk.components.methods import method_of

    data, method = recipe.data, method_of(recipe)
    if not data.cache_text_embeddings:
        return "data.cache_text_embeddings = false"
    if method.trains_text_encoders(recipe):
        return f"{method.adapter}.train_text_encoders = true, so their outputs change every step"
    if data.shuffle_tags and not data.tag_shuffle_variants:
        return (
            "data.shuffle_tags = true gives every step a new tag order; set data.tag_shuffle_variants = N "
            "to cache N fixed shuffles per caption instead"
        )
    return None


def build_data_caches(
    recipe: Recipe, dataset: Any, denoiser: Any, model: Any, accelerator: Any, epochs: int, stop: Any = None
) -> list[str]:
    """Fill the latent and text-embedding caches for every epoch to run, then point the dataset at them.

    Returns the model parts that training no longer needs (the VAE, the text encoders)."""
    from loratk.data.cache import (
        LatentCache,
        TextEmbeddingCache,
        build_latent_cache,
        build_text_cache,
        compute_module_fingerprint,
    )
    from loratk.files import default_data_cache_dir

    data = recipe.data
    root = Path(data.cache_dir) if data.cache_dir else default_data_cache_dir()
    main = accelerator.is_main_process
    shard = dict(
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        progress=main,
        should_stop=(lambda: stop.requested) if stop is not None else None,
    )
    epoch_range = range(1, epochs + 1)
    latents = text = None
    if data.cache_latents:
        vae = model.vae
        latents = LatentCache(
            root,
            compute_module_fingerprint([vae], extra=f"vae|{vae.dtype}"),
            recipe.model.vae or recipe.model.path,
            channels=vae.config.latent_channels,
            downscale=2 ** (len(vae.config.block_out_channels) - 1),
        )
        if not data.center_crop:
            logger.info(
                f"latent cache with random crops: every crop drawn for epochs 1..{epochs} is encoded once; "
                "data.center_crop = true needs at most two entries per image (flipped or not)",
                main_process_only=True,
            )
        stats = build_latent_cache(
            latents,
            dataset.latent_requests(epoch_range),
            denoiser.encode_latent_dist,
            max_pixels=data.max_pixels,
            **shard,
        )
        report = logger.warning if stats.rebuilt else logger.info  # a damaged entry is worth a warning
        report(f"latent cache {latents.folder}: {stats.describe()}", main_process_only=True)
    else:
        logger.info(
            "latent cache off (data.cache_latents = false): the VAE encodes every batch",
            main_process_only=True,
        )
    reason = text_cache_off_reason(recipe)
    if reason is None:
        tokenizers = "|".join(
            f"{type(t).__name__}:{len(t)}:{t.model_max_length}:{_vocab_digest(t)}"
            for t in model.tokenizers.values()
        )
        text = TextEmbeddingCache(
            root,
            compute_module_fingerprint(list(model.text_encoders.values()), extra=f"text|{tokenizers}"),
            recipe.model.path,
            keys=model.family.conditioning_keys,
        )
        stats = build_text_cache(text, dataset.caption_texts(epoch_range), denoiser.encode_captions, **shard)
        report = logger.warning if stats.rebuilt else logger.info
        report(f"text-embedding cache {text.folder}: {stats.describe()}", main_process_only=True)
    else:
        logger.info(f"text-embedding cache off: {reason}", main_process_only=True)
    accelerator.wait_for_everyone()
    dataset.use_caches(latents=latents, text=text)
    return (["vae"] if latents else []) + (list(model.text_encoders) if text else [])


def _vocab_digest(tokenizer: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
