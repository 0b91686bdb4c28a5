"""Deterministic tiny random SD 1.5 and SD 2.x models (`builtin:tiny-sd15`, `builtin:tiny-sd2`,
`builtin:tiny-sd2-v`), saved with `save_pretrained` and loaded back through `from_pretrained` like hub models.

Each keeps its family's structure, so LDM key names, diffusers' converters and family detection behave as on
the real models: four UNet levels with cross-attention in the first three down blocks and the last three up
blocks, two layers per block; SD 1.x's convolutional transformer projections and quick-gelu CLIP-L, SD 2.x's
linear projections and gelu OpenCLIP-H; the real schedulers' settings (SD 2.x-v predicts v).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loratk.models.tiny import TINY_VAE_CONFIG, _text_config, build_tiny_tokenizer, materialise_folder

TINY_SD15_ID = "builtin:tiny-sd15"
TINY_SD2_ID = "builtin:tiny-sd2"
TINY_SD2_V_ID = "builtin:tiny-sd2-v"
_TINY_SD_VERSION = "1"  # bump when these configs change, so stale cache folders are rebuilt

_UNET_BLOCKS = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
)
# SD 1.5: CLIP-L width (768 there, 32 here) is the cross-attention width; 8 heads everywhere (diffusers'
# `attention_head_dim` means heads in these configs); 1x1-conv proj_in / proj_out.
TINY_SD15_UNET_CONFIG = dict(
    _UNET_BLOCKS, sample_size=8, attention_head_dim=2, cross_attention_dim=32, use_linear_projection=False
)
# SD 2.x: OpenCLIP-H width (1024 there, 48 here), heads growing with the width (5, 10, 20, 20 there), Linear
# proj_in / proj_out. The 768-v model's UNet is larger (sample size 96 vs 64: 12 vs 8 here).
TINY_SD2_UNET_CONFIG = dict(
    _UNET_BLOCKS,
    sample_size=8,
    attention_head_dim=(2, 4, 4, 4),
    cross_attention_dim=48,
    use_linear_projection=True,
)
TINY_SD1_WIDTH, TINY_SD2_WIDTH = 32, 48

# The real models' scheduler settings (stable-diffusion-v1-5: PNDM; stable-diffusion-2-1(-base): DDIM).
_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
)


@dataclass(frozen=True)
class TinySpec:
    name: str  # cache folder stem
    unet: dict
    text_width: int
    hidden_act: str
    scheduler: str  # diffusers class name
    prediction_type: str


TINY_SD_MODELS: dict[str, TinySpec] = {
    TINY_SD15_ID: TinySpec(
        "tiny-sd15", TINY_SD15_UNET_CONFIG, TINY_SD1_WIDTH, "quick_gelu", "PNDMScheduler", "epsilon"
    ),
    TINY_SD2_ID: TinySpec(
        "tiny-sd2", TINY_SD2_UNET_CONFIG, TINY_SD2_WIDTH, "gelu", "DDIMScheduler", "epsilon"
    ),
    TINY_SD2_V_ID: TinySpec(
        "tiny-sd2-v",
        dict(TINY_SD2_UNET_CONFIG, sample_size=12),
        TINY_SD2_WIDTH,
        "gelu",
        "DDIMScheduler",
        "v_prediction",
    ),
}


def build_tiny_sd_pipeline(tiny_id: str = TINY_SD15_ID, seed: int = 0):
    """A tiny random `StableDiffusionPipeline` of the `tiny_id` kind, identical for a given seed."""
    with torch.random.fork_rng(devices=[]):  # building leaves the caller's RNG as it was
        return _build(TINY_SD_MODELS[tiny_id], seed)


def _build(spec: TinySpec, seed: int):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**dict(TINY_VAE_CONFIG, scaling_factor=0.18215))  # SD 1.x/2.x's VAE scale
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, spec.text_width, spec.hidden_act))
    scheduler_class = getattr(diffusers, spec.scheduler)
    options = {"skip_prk_steps": True} if spec.scheduler == "PNDMScheduler" else {"clip_sample": False}
    scheduler = scheduler_class(**_SCHEDULER, **options, prediction_type=spec.prediction_type)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(folder: str | os.PathLike, tiny_id: str = TINY_SD15_ID, seed: int = 0) -> Path:
    """Write a tiny SD 1.5 / SD 2.x diffusers folder (model_index.json + subfolders) and return its path."""
    folder = Path(folder)
    build_tiny_sd_pipeline(tiny_id, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def materialise_tiny_sd(tiny_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache folder of a tiny SD model, building it once (atomically) if it is not there yet."""
    spec = TINY_SD_MODELS[tiny_id]
    return materialise_folder(
        f"{spec.name}-v{_TINY_SD_VERSION}",
        "model_index.json",
        lambda folder: save_tiny_sd(folder, tiny_id),
        cache_dir,
    )
