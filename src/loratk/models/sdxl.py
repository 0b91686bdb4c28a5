"""The SDXL family: UNet, VAE, CLIP-L and OpenCLIP-G with their tokenizers; prompt encoding with the pooled
embedding and the time ids; its single-file layout (SGM) and its LoRA key names.

Conditioning matches `StableDiffusionXLPipeline.encode_prompt`, so what the UNet sees in training is what it
sees when sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loratk.export.formats import diffusers_to_sgm_unet_name, text_encoder_kohya_name
from loratk.export.single_file import (
    convert_clip_l_to_sgm,
    convert_open_clip_to_sgm,
    convert_unet_to_sgm,
    convert_vae_to_sgm,
)
from loratk.models.family import DiffusionModel, load_model


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length: [B, 77]."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    prompts: Sequence[str],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both encoders; returns (prompt_embeds [B, 77, D1+D2], pooled [B, P]) from the penultimate layers."""
    hidden: list[torch.Tensor] = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenize_prompts(tokenizer, prompts).to(device)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # only CLIPTextModelWithProjection returns a [B, P] first output
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError(
            "no text encoder returned a pooled embedding; SDXL needs CLIPTextModelWithProjection"
        )
    return torch.cat(hidden, dim=-1), pooled


def compute_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor
) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample: [B, 6].

    Each input is [B, 2] (height, width) / (top, left), taken from each image's own resize and crop.
    """
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()


def _up_blocks_with_attention(unet_config: Any) -> int:
    return sum(1 for t in unet_config.up_block_types if "CrossAttn" in t)


class SDXLFamily:
    """Stable Diffusion XL 1.0 and its fine-tunes."""

    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")  # CLIP-L, OpenCLIP-G
    tokenizer_names = ("tokenizer", "tokenizer_2")
    default_resolution = 1024
    conditioning_keys = ("prompt_embeds", "pooled_prompt_embeds")
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def component_classes(self) -> dict[str, str]:
        return {
            "unet": "diffusers.UNet2DConditionModel",
            "vae": "diffusers.AutoencoderKL",
            "text_encoder": "transformers.CLIPTextModel",
            "text_encoder_2": "transformers.CLIPTextModelWithProjection",
            "tokenizer": "transformers.CLIPTokenizer",
            "tokenizer_2": "transformers.CLIPTokenizer",
        }

    def pipeline_options(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def encode_prompts(
        self, model: DiffusionModel, prompts: Sequence[str], device: Any
    ) -> dict[str, torch.Tensor]:
        embeds, pooled = encode_prompts(
            list(model.text_encoders.values()), list(model.tokenizers.values()), prompts, device
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def batch_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            "time_ids": compute_time_ids(
                batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"]
            )
        }

    def zero_empty_prompts(self) -> bool:
        # The pipeline feeds zeros for an empty negative prompt (`force_zeros_for_empty_prompt`).
        return True

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return unet(
            noisy.to(dtype),
            timesteps,
            conditioning["prompt_embeds"].to(dtype),
            added_cond_kwargs={
                "text_embeds": conditioning["pooled_prompt_embeds"].to(dtype),
                # fp32, as kohya does: bf16 rounds sizes before they are embedded (1333 -> 1336).
                "time_ids": conditioning["time_ids"].float(),
            },
        ).sample

    def text_encoder_lora_targets(self, name: str, encoder: Any) -> str:
        """All four of q, k, v and out per layer (A1111 applies CLIP-G attention LoRA only when all are there).

        SDXL conditions on the penultimate hidden state, so CLIP-L's last layer never gets a gradient;
        CLIP-G's last layer still feeds the pooled embedding.
        """
        num_layers = encoder.config.num_hidden_layers
        last = num_layers if name == "text_encoder_2" else num_layers - 1
        layers = "|".join(str(i) for i in range(last))
        return rf".*encoder\.layers\.({layers})\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    def kohya_unet_name(self, module: str, unet_config: Any | None = None) -> str:
        """The SGM name (kohya's SDXL keys); `unet_config` None means SDXL's own layout."""
        if unet_config is None:
            return diffusers_to_sgm_unet_name(module)
        return diffusers_to_sgm_unet_name(
            module, unet_config.layers_per_block, _up_blocks_with_attention(unet_config)
        )

    def kohya_text_encoder_name(self, module: str) -> str:
        return text_encoder_kohya_name(module)

    def lora_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }

    def checkpoint_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        return {**self.lora_metadata(), "modelspec.architecture": "stable-diffusion-xl-v1-base"}

    def single_file_state_dict(self, model: DiffusionModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """UNet, VAE, CLIP-L and OpenCLIP-G as one SGM-layout checkpoint (`from_single_file`, A1111, ComfyUI)."""
        config = model.unet.config
        tensors = convert_unet_to_sgm(
            model.unet.state_dict(),
            layers_per_block=config.layers_per_block,
            up_blocks_with_attention=_up_blocks_with_attention(config),
        )
        tensors.update(
            convert_vae_to_sgm(model.vae.state_dict(), num_up_blocks=len(model.vae.config.up_block_types))
        )
        tensors.update(convert_clip_l_to_sgm(model.text_encoder.state_dict()))
        tensors.update(convert_open_clip_to_sgm(model.text_encoder_2.state_dict()))
        return {k: v.detach().to("cpu", dtype=dtype).contiguous() for k, v in tensors.items()}


SDXL = SDXLFamily()


def load_sdxl(path: str, **options: Any) -> DiffusionModel:
    """An SDXL model from a hub id, folder, single file or `builtin:tiny-sdxl` (see `family.load_model`)."""
    return load_model(SDXL, path, **options)
