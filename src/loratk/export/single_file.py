"""Full weights (diffusers parts) -> the original SGM/LDM checkpoint layout (A1111, ComfyUI), part by part;
a model family composes them into its single-file checkpoint (SDXL: `conditioner.embedders.*`; SD 1.x:
`cond_stage_model.transformer.*`; SD 2.x: `cond_stage_model.model.*`, OpenCLIP's own naming).

diffusers ships only the other direction (`loaders/single_file_utils.py`); these are its inverse, proven by
round trips through `from_single_file` in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import torch

from loratk.export.formats import diffusers_to_sgm_unet_name

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # CLIP-L of SD 1.x
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP-H of SD 2.x

Tensors = dict[str, torch.Tensor]


def convert_unet_to_sgm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    layers_per_block: int = 2,
    up_blocks_with_attention: int | Collection[int] = 2,
) -> Tensors:
    """diffusers UNet weights -> `model.diffusion_model.*` (module paths mapped, parameter names kept)."""
    out: Tensors = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        name = diffusers_to_sgm_unet_name(module, layers_per_block, up_blocks_with_attention)
        out[f"{UNET_PREFIX}{name}.{param}"] = tensor
    return out


_VAE_TOP = {
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_name(key: str, num_up_blocks: int) -> str:
    side, _, rest = key.partition(".")  # encoder / decoder / quant_conv / post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest)
    if m:
        kind, i, part, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        level = i if kind == "down" else num_up_blocks - 1 - i  # LDM numbers decoder levels bottom-up
        if part == "resnets":
            return f"{side}.{kind}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        sampler = "downsample" if kind == "down" else "upsample"
        return f"{side}.{kind}.{level}.{sampler}.{tail}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest)
    if m:
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
    head, _, param = rest.rpartition(".")
    return f"{side}.{_VAE_TOP.get(head, head)}.{param}"


def convert_vae_to_sgm(state_dict: Mapping[str, torch.Tensor], *, num_up_blocks: int) -> Tensors:
    """diffusers AutoencoderKL weights -> `first_stage_model.*`; attention Linears become 1x1 convs."""
    out: Tensors = {}
    for key, tensor in state_dict.items():
        name = _vae_name(key, num_up_blocks)
        if ".mid.attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # [C, C] -> [C, C, 1, 1]
        out[VAE_PREFIX + name] = tensor
    return out


def convert_clip_l_to_sgm(state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> Tensors:
    """CLIP-L (`CLIPTextModel`) weights -> `<prefix>*`: SDXL's `conditioner.embedders.0.transformer.text_model.`
    by default, SD 1.x's `cond_stage_model.transformer.text_model.` (CLIP-L keeps transformers' names).

    transformers 5 flattened `CLIPTextModel` (no `text_model.` root); older state dicts still have it.
    """
    return {
        prefix + key.removeprefix("text_model."): tensor
        for key, tensor in state_dict.items()
        if not key.endswith("position_ids")
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def convert_open_clip_to_sgm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
) -> Tensors:
    """OpenCLIP weights in transformers' layout -> open_clip's names under `prefix`: SDXL's OpenCLIP-G
    (`CLIPTextModelWithProjection`) under `conditioner.embedders.1.model.` by default, SD 2.x's OpenCLIP-H
    (`CLIPTextModel`, no projection) under `cond_stage_model.model.`.

    q/k/v are fused into `attn.in_proj_weight` / `in_proj_bias`, and `text_projection` is stored transposed
    ([width, embed_dim]), as open_clip keeps it.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: Tensors = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    for key, name in fixed.items():
        out[prefix + name] = sd.pop(key)
    if "text_projection.weight" in sd:  # SD 2.x's encoder has none: its UNet reads the hidden states only
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            parts = [sd.pop(f"{src}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
        for key in [k for k in sd if k.startswith(src)]:
            rest = key[len(src) :]
            head, _, param = rest.rpartition(".")
            out[f"{dst}{_OPEN_CLIP_LAYER.get(head, head)}.{param}"] = sd.pop(key)
    if sd:
        raise ValueError(f"OpenCLIP weights with no open_clip name: {sorted(sd)[:3]}")
    return out
