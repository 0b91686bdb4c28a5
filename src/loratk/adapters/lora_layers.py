"""LoRA layers in torch modules through PEFT's own API: injection, loading saved LoRA weights into a text
encoder, and counting a LoRA's size. Knows no model family: targets come in as peft patterns."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from typing import Any

import torch

# Every Linear inside the UNet's transformer blocks (kohya's default LoRA targets), as one peft regex.
_ALL_LINEAR = (
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
_ATTENTION = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"


# Down-projection init -> peft's `init_lora_weights` (the up-projection always starts at zero).
# "kaiming": kaiming-uniform with a = sqrt(5), kohya's and PEFT's default, so kohya learning rates carry
# over; "gaussian": std 1 / rank, the diffusers examples' choice.
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}


def resolve_unet_targets(targets: str | list[str]) -> str | list[str]:
    """A preset name -> a peft regex; an explicit list of module-name suffixes passes through."""
    if targets == "all-linear":
        return _ALL_LINEAR
    if targets == "attention":
        return _ATTENTION
    if isinstance(targets, str):
        raise ValueError(f"lora.targets must be 'all-linear', 'attention' or a list, got {targets!r}")
    return list(targets)


def count_lora_parameters(unet: torch.nn.Module, targets: str | list[str], rank: int) -> tuple[int, int]:
    """(modules, parameters) of a rank-`rank` LoRA on `unet`'s `targets`; works on the meta device, so the
    size of a full-size SDXL LoRA file (2 bytes per parameter in fp16) is known without any weights."""
    from loratk.export.extract import target_weights

    weights = target_weights(unet, resolve_unet_targets(targets))
    return len(weights), sum(rank * (w.shape[0] + w.shape[1]) for w in weights.values())


def inject_lora(module: torch.nn.Module, config: Any, adapter_name: str = "default") -> None:
    """Add LoRA layers to `module` in place through PEFT's own injection API.

    Not through the integration layers (`add_adapter` / `load_adapter` of transformers and diffusers): each
    checks the installed PEFT against its own minimum version, and transformers 5.24 refuses every PEFT that
    has been released (it asks for 0.22). PEFT itself records `module.peft_config`, which saving reads.
    """
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        # Expected when a second adapter goes into the same module (`loratk sample` with several files).
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)


def load_text_encoder_lora(
    encoder: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    prefix: str,
    adapter_name: str,
    network_alphas: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """Load the `prefix.*` text-encoder LoRA weights of a diffusers-converted state dict into `encoder`.

    `state_dict` and `network_alphas` are what a diffusers pipeline's `lora_state_dict` returns (kohya files
    converted, keys prefixed by the part name, `text_encoder.` ...); `config` is the file's own LoRA config for
    this part, where it has one (diffusers-layout files). The adapter goes in through PEFT directly
    (`inject_lora`), not through transformers' `load_adapter`, which refuses PEFT releases older than its own
    minimum. Returns the number of modules adapted (0 when the file has no weights for this encoder).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    mine = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if not mine:
        return 0
    strip_root = not hasattr(encoder, "text_model")  # transformers 5 dropped CLIPTextModel.text_model
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    # Rename the keys as diffusers does (legacy / kohya-converted names -> PEFT names), on index tensors, so
    # each new name can be traced to its original key: a file's alphas are keyed by the original names.
    keys = list(mine)
    indexed = {key: torch.tensor(i) for i, key in enumerate(keys)}
    renamed = convert_state_dict_to_peft(convert_state_dict_to_diffusers(indexed))
    for new, index in renamed.items():
        key = keys[int(index)]
        new = new.removeprefix("text_model.") if strip_root else new
        peft_sd[new] = mine[key]
        alpha = (network_alphas or {}).get(f"{prefix}.{key}.alpha")
        if alpha is not None and ".lora_A." in new:
            alphas[new.split(".lora_A.")[0]] = float(alpha)
    ranks = {k.split(".lora_B.")[0]: v.shape[1] for k, v in peft_sd.items() if ".lora_B." in k}
    if config is None:
        rank = Counter(ranks.values()).most_common(1)[0][0]
        # A module without an alpha in the file has alpha = its rank (scale 1), as every loader reads it.
        per_module = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
        alpha = Counter(per_module.values()).most_common(1)[0][0]
        config = dict(
            r=rank,
            lora_alpha=alpha,
            rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(m): a for m, a in per_module.items() if a != alpha},
            target_modules=sorted(ranks),
        )
    inject_lora(encoder, LoraConfig(**config), adapter_name)
    result = set_peft_model_state_dict(encoder, peft_sd, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise ValueError(f"{len(unexpected)} {prefix} LoRA weights match no module, e.g. {unexpected[0]}")
    return len(ranks)
