"""SDXL conditioning: prompts through both CLIP encoders (plus the pooled embedding), and time ids.

Matches `StableDiffusionXLPipeline.encode_prompt`, so what the UNet sees in training is what it sees when sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
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
    tokenizers: Sequence,
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
