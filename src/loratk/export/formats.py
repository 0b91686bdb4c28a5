"""LoRA file layouts: PEFT state dicts -> the kohya layout (SDXL: SGM UNet names; SD 1.x/2.x: diffusers
names, as kohya writes them for those families), plus the run's metadata.

The kohya/SGM layout is the one that loads completely in diffusers, ComfyUI, Forge, A1111 and kohya
(shared/REFERENCE.md §1). Reading goes the other way through diffusers' own converters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

_RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, [_RESNET_PARTS.get(head, head), tail]))


def diffusers_to_sgm_unet_name(
    name: str, layers_per_block: int = 2, up_blocks_with_attention: int | Collection[int] = 2
) -> str:
    """Map a diffusers UNet module path to the original (SGM / LDM) name: SDXL's, and SD 1.x/2.x's.

    `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`. Transformer internals keep their names.
    `up_blocks_with_attention` says which up blocks hold attentions: their upsampler sits at position 2 of the
    SGM block, after the resnet and the attention (elsewhere at 1). A number counts the leading ones (2 in
    SDXL); SD 1.x/2.x pass the indices ({1, 2, 3}: their first up block has none).
    """
    for old, new in _TOP_LEVEL.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    per_down = layers_per_block + 1  # resnets + the downsampler slot
    per_up = layers_per_block + 1  # up blocks have one more resnet than down blocks
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.?(.*)$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{per_down * i + per_down}.0." + rest.replace("conv", "op", 1)
        slot = 0 if kind == "resnets" else 1
        rest = _resnet_inner(rest) if kind == "resnets" else rest
        return f"input_blocks.{per_down * i + j + 1}.{slot}.{rest}".rstrip(".")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.?(.*)$", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}".rstrip(".")
        return f"middle_block.{2 * j}.{_resnet_inner(rest)}".rstrip(".")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.?(.*)$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            with_attention = (
                i < up_blocks_with_attention
                if isinstance(up_blocks_with_attention, int)
                else i in up_blocks_with_attention
            )
            slot = 2 if with_attention else 1
            return f"output_blocks.{per_up * i + layers_per_block}.{slot}.{rest}".rstrip(".")
        slot = 0 if kind == "resnets" else 1
        rest = _resnet_inner(rest) if kind == "resnets" else rest
        return f"output_blocks.{per_up * i + j}.{slot}.{rest}".rstrip(".")
    raise ValueError(f"UNet module {name!r} has no SGM name; it cannot be exported in the kohya layout")


def text_encoder_kohya_name(name: str) -> str:
    """CLIP module path with the `text_model.` root that ComfyUI and A1111 expect.

    transformers 5's `CLIPTextModel` has no `text_model` wrapper, so its paths start at `encoder.`.
    """
    return name if name.startswith("text_model.") else "text_model." + name


def _split_peft_key(key: str) -> tuple[str, str]:
    """`a.b.lora_A.weight` -> (`a.b`, `lora_down`)."""
    m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
    if not m:
        raise ValueError(f"{key!r} is not a PEFT LoRA weight (expected '<module>.lora_A.weight' / 'lora_B')")
    return m[1], "lora_down" if m[2] == "A" else "lora_up"


def peft_to_kohya(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    alpha: float,
    *,
    family: Any,
    unet_config: Any | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Convert PEFT LoRA state dicts (keyed by model part: `unet` and the family's text encoders) to one
    kohya dict, with the family's key prefixes and module names.

    Keys: `lora_unet_input_blocks_4_1_proj_in.lora_down.weight` (SDXL), `.lora_up.weight`, and a 0-dim
    `.alpha`. One alpha for the whole file (diffusers mis-applies per-module alphas).
    """
    out: dict[str, torch.Tensor] = {}
    for part, sd in state_dicts.items():
        if part not in family.lora_prefixes:
            raise ValueError(
                f"unknown model part {part!r}; expected one of {', '.join(family.lora_prefixes)}"
            )
        for key, tensor in sd.items():
            module, which = _split_peft_key(key)
            if part == "unet":
                module = family.kohya_unet_name(module, unet_config)
            else:
                module = family.kohya_text_encoder_name(module)
            base = family.lora_prefixes[part] + module.replace(".", "_")
            out[f"{base}.{which}.weight"] = tensor.detach().to("cpu", dtype=dtype).contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def build_training_metadata(
    *,
    name: str,
    resolution: tuple[int, int],
    base_model: str,
    learning_rate: float,
    optimizer: str,
    epoch: int,
    steps: int,
    num_train_images: int,
    tag_frequency: Mapping[str, Mapping[str, int]],
    seed: int,
    recipe_toml: str,
    loratk_version: str,
    method: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """What every file of a run records about its training, for people and the tools that list files.

    The adapter adds what the file is (its family's `ss_base_model_version` / `modelspec.architecture`, a
    LoRA's network keys), so a full checkpoint never carries LoRA keys.
    """
    width, height = resolution
    meta = {
        "ss_output_name": name,
        "ss_resolution": f"({width}, {height})",
        "ss_learning_rate": str(learning_rate),
        "ss_optimizer": optimizer,
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_num_train_images": str(num_train_images),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_seed": str(seed),
        "ss_sd_model_name": base_model,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": name,
        "modelspec.resolution": f"{width}x{height}",
        "loratk.version": loratk_version,
        "loratk.method": method,
        "loratk.base_model": base_model,
        "loratk.epoch": str(epoch),
        "loratk.recipe": recipe_toml,
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def compute_tag_frequency(captions_by_dir: Mapping[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {folder: {comma-separated tag: count}}."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_dir.items():
        counts: dict[str, int] = {}
        for caption in captions:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        out[folder] = counts
    return out
