"""Load the SDXL parts that training needs: UNet, VAE, both text encoders and tokenizers, noise scheduler.

A model is a hub id, a local diffusers folder, a single `.safetensors` checkpoint, or `builtin:tiny-sdxl`.
All of them go through diffusers' / transformers' own `from_pretrained` / `from_single_file`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratk.models.tiny import TINY_SDXL_ID, materialise_tiny_sdxl

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SDXLModel:
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any  # DDPM-style scheduler: add_noise and alphas_cumprod for training
    source: str  # the model path as the user gave it (written into export metadata)

    @property
    def text_encoders(self) -> tuple[Any, Any]:
        return (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[Any, Any]:
        return (self.tokenizer, self.tokenizer_2)

    def replace(self, **changes: Any) -> SDXLModel:
        return dataclasses.replace(self, **changes)


class ModelLoadError(RuntimeError):
    pass


def resolve_model_path(path: str) -> str:
    """Turn `builtin:tiny-sdxl` into its cache folder; return anything else unchanged."""
    return str(materialise_tiny_sdxl()) if path == TINY_SDXL_ID else path


def _is_single_file(path: str) -> bool:
    return path.endswith((".safetensors", ".sft"))


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_all_weights_loaded(parts: dict[str, Any], where: str) -> None:
    """Raise `ModelLoadError` naming every weight a loader left unloaded (on the meta device).

    diffusers' single-file loader leaves a weight it found no key for on `meta` without a word, and the
    run would fail much later with "Cannot copy out of meta tensor".
    """
    missing = [
        f"{name}.{key}"
        for name, module in parts.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_meta
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"{where}: {len(missing)} weight(s) were not loaded: {shown}. The checkpoint has no weights for "
            "them, or they were not recognised; check that it is a complete SDXL checkpoint (and that "
            "model.single_file_config describes it)"
        )


def load_sdxl(
    path: str,
    *,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> SDXLModel:
    """Load all SDXL parts in fp32 on the CPU; `freeze_and_cast` then places them."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    where = resolve_model_path(path)
    if where.lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"model.path = {path!r}: a pickle checkpoint ({Path(where).suffix}); loratk loads only "
            ".safetensors checkpoints and diffusers folders, because loading a pickle can run any code it "
            "holds. Convert it once with a tool you trust (for example diffusers' "
            "`StableDiffusionXLPipeline.from_single_file(path).save_pretrained(folder)`), or use the "
            ".safetensors release of the model"
        )
    try:
        if _is_single_file(where):
            if not Path(where).is_file():
                raise FileNotFoundError(f"{where}: no such checkpoint file")
            kwargs = {"config": resolve_model_path(single_file_config)} if single_file_config else {}
            pipe = StableDiffusionXLPipeline.from_single_file(where, **kwargs)
            parts = dict(
                unet=pipe.unet,
                vae=pipe.vae,
                text_encoder=pipe.text_encoder,
                text_encoder_2=pipe.text_encoder_2,
                tokenizer=pipe.tokenizer,
                tokenizer_2=pipe.tokenizer_2,
                noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            )
        else:
            common = dict(revision=revision)
            weights = dict(common, variant=variant)
            parts = dict(
                unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", **weights),
                vae=AutoencoderKL.from_pretrained(where, subfolder="vae", **weights),
                text_encoder=CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    where, subfolder="text_encoder_2", **weights
                ),
                tokenizer=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common),
                tokenizer_2=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **common),
                noise_scheduler=DDPMScheduler.from_pretrained(where, subfolder="scheduler", **common),
            )
        if vae:
            parts["vae"] = AutoencoderKL.from_pretrained(resolve_model_path(vae), **dict(revision=revision))
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"
            if offline
            else "check the hub id or folder (a diffusers folder has model_index.json and unet/, vae/ ...)"
        )
        raise ModelLoadError(
            f"model.path = {path!r}: could not load the SDXL model: {err}\n  hint: {hint}"
        ) from err
    check_all_weights_loaded(parts, where)
    return SDXLModel(**parts, source=path)


def freeze_and_cast(
    model: SDXLModel, device: torch.device, weight_dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()
) -> None:
    """Freeze every weight and move it to `device` in the mixed-precision dtype.

    The VAE never runs in fp16 (the SDXL VAE overflows to NaN there): it stays fp32 under fp16, bf16 under bf16.
    Parts named in `keep_fp32` (fully trained ones) stay in fp32, never rounded through the mixed dtype.
    """
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
    for name, dtype in (
        ("unet", weight_dtype),
        ("text_encoder", weight_dtype),
        ("text_encoder_2", weight_dtype),
        ("vae", vae_dtype),
    ):
        module = getattr(model, name)
        dtype = torch.float32 if name in keep_fp32 else dtype
        module.requires_grad_(False)
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)


def enable_text_encoder_checkpointing(encoder: Any) -> None:
    """Activation checkpointing on a transformers text encoder, with gradients reaching its LoRA layers.

    transformers turns on gradients of the embedding output (which reentrant checkpointing needs to reach
    the LoRA layers behind frozen embeddings) only for adapters added through its own PEFT integration in
    some releases; loratk injects through PEFT directly, so it asks for them itself.
    """
    # `activation_checkpointing_enable` is the newer name (transformers 5.24 warns on the old one).
    enable = (
        getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    )
    enable()
    encoder.enable_input_require_grads()


# ---------------------------------------------------------------- memory and speed ([performance])

ATTENTION_BACKENDS = ("sdpa", "xformers")
XFORMERS_HINT = "pip install 'loratk[xformers]'"


def require_attention_backend(attention: str) -> None:
    """Fail before any model is loaded when the attention backend cannot run here."""
    import importlib.util

    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError(
            f"performance.attention = 'xformers' needs xformers: {XFORMERS_HINT} "
            "(or use attention = 'sdpa', PyTorch's own memory-efficient attention)"
        )


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (Ampere and newer); no effect on CPUs or older GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_performance_options(
    unet: torch.nn.Module,
    *,
    attention: str = "sdpa",
    tf32: bool = True,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> None:
    """Apply the `[performance]` options to the UNet, in place. Call after the adapter is injected.

    `compile_unet` uses `Module.compile`, which keeps the module (and so its state-dict keys) as it is and
    compiles on the first forward pass.
    """
    require_attention_backend(attention)
    set_tf32(tf32)
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()


def offload_frozen_encoders(
    model: SDXLModel,
    device: torch.device | str = "cpu",
    names: Sequence[str] = ("vae", "text_encoder", "text_encoder_2"),
) -> list[str]:
    """Move the VAE and the text encoders to `device` (the CPU by default), unless they train.

    Call once latents and text embeddings are cached: from then on training needs only the UNet on the
    accelerator. Sampling still needs them, so a sampler must move them back (or run where they are).
    Returns the names of the parts moved.
    """
    moved = []
    for name in names:
        module = getattr(model, name)
        if module is None or any(p.requires_grad for p in module.parameters()):
            continue
        module.to(device)
        moved.append(name)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved
