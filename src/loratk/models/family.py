"""The model-family seam: what a family of base models (SDXL; SD 1.x/2.x) must say, the loaded model, and
the loading every family shares. Nothing outside `models/` knows a family's parts by name.

A model is a hub id, a local diffusers folder, a single `.safetensors` checkpoint, or `builtin:tiny-...`; all
of them load through diffusers' / transformers' own `from_pretrained` / `from_single_file`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class DiffusionModel:
    """The parts of one loaded model, under the names its pipeline gives them.

    `model.text_encoder_2` and `model.tokenizer` work as attributes too (the pipeline's component names).
    """

    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: dict[str, Any]  # name -> encoder, in the family's order
    tokenizers: dict[str, Any]  # name -> tokenizer, in the same order
    noise_scheduler: Any  # DDPM-style scheduler: add_noise and alphas_cumprod for training
    source: str  # the model path as the user gave it (written into export metadata)

    def __getattr__(self, name: str) -> Any:
        for table in ("text_encoders", "tokenizers"):
            try:
                parts = object.__getattribute__(self, table)
            except AttributeError:  # not built yet (copy, pickle)
                break
            if name in parts:
                return parts[name]
        raise AttributeError(f"{type(self).__name__} has no part {name!r}")

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        """Every module by name: unet, vae, then the text encoders."""
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}

    def part(self, name: str) -> torch.nn.Module:
        try:
            return self.parts[name]
        except KeyError:
            raise KeyError(
                f"{self.family.name} has no part {name!r}; its parts: {', '.join(self.parts)}"
            ) from None

    def replace(self, **parts: Any) -> DiffusionModel:
        """The same model with some parts swapped (prepared/wrapped modules, gathered weights)."""
        encoders = {k: parts.pop(k) if k in parts else v for k, v in self.text_encoders.items()}
        unknown = set(parts) - {"unet", "vae", "noise_scheduler"}
        if unknown:
            raise KeyError(f"{self.family.name} has no part(s) {sorted(unknown)}")
        return dataclasses.replace(self, text_encoders=encoders, **parts)


class ModelFamily(Protocol):
    """What loratk needs to know about a family of base models; one object per family."""

    name: str  # "sdxl", "sd1", "sd2": recipes' `model.family`
    label: str  # for people: "SDXL", "SD 1.x", "SD 2.x"
    pipeline_class: str  # the diffusers pipeline, e.g. "StableDiffusionXLPipeline"
    text_encoder_names: tuple[str, ...]  # pipeline component names, in order
    tokenizer_names: tuple[str, ...]
    default_resolution: (
        int  # the side the family was trained at (1024 for SDXL; a model's own UNet says more)
    )
    conditioning_keys: tuple[str, ...]  # what `encode_prompts` returns (and the text cache stores)
    lora_prefixes: dict[str, str]  # model part -> kohya key prefix (lora_unet_, lora_te1_ ...)

    def component_classes(self) -> dict[str, str]:
        """Part name -> "library.Class" of each part loaded from a diffusers folder (subfolder = name)."""
        ...

    def pipeline_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the family's pipeline class (SDXL: no watermarker)."""
        ...

    def encode_prompts(
        self, model: DiffusionModel, prompts: Sequence[str], device: Any
    ) -> dict[str, torch.Tensor]:
        """The UNet's text conditioning for `prompts`, as the family's pipeline computes it."""
        ...

    def batch_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Conditioning that comes from the batch itself (SDXL's time ids); {} where the family has none."""
        ...

    def zero_empty_prompts(self) -> bool:
        """Whether the pipeline feeds zeros, not the encoded empty prompt, as the unconditional input."""
        ...

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """One UNet forward pass on noisy latents with the conditioning (text and batch)."""
        ...

    def text_encoder_lora_targets(self, name: str, encoder: Any) -> str:
        """A peft regex over the attention projections of the layers whose output the UNet reads."""
        ...

    def kohya_unet_name(self, module: str, unet_config: Any) -> str:
        """A diffusers UNet module path as kohya-layout LoRA keys name it for this family."""
        ...

    def kohya_text_encoder_name(self, module: str) -> str:
        """A text-encoder module path as kohya-layout LoRA keys name it."""
        ...

    def lora_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        """The keys A1111 / Forge read to list a LoRA under this family (and `model`'s variant: SD 2.x-v)."""
        ...

    def checkpoint_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        """The same keys for a full single-file checkpoint."""
        ...

    def single_file_state_dict(self, model: DiffusionModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All parts as one checkpoint in the original (LDM/SGM) layout that A1111 and ComfyUI load."""
        ...


# ---------------------------------------------------------------- loading, shared by every family


def resolve_model_path(path: str) -> str:
    """Turn a `builtin:` name into its cache folder; return anything else unchanged."""
    from loratk.models.tiny import materialise_builtin

    return str(materialise_builtin(path)) if path.startswith("builtin:") else path


def is_single_file(path: str) -> bool:
    return path.endswith((".safetensors", ".sft"))


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def refuse_pickle(path: str, where: str) -> None:
    if where.lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"model.path = {path!r}: a pickle checkpoint ({Path(where).suffix}); loratk loads only "
            ".safetensors checkpoints and diffusers folders, because loading a pickle can run any code it "
            "holds. Convert it once with a tool you trust (for example diffusers' "
            "`StableDiffusionXLPipeline.from_single_file(path).save_pretrained(folder)`), or use the "
            ".safetensors release of the model"
        )


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
            "them, or they were not recognised; check that it is a complete checkpoint of its family (and "
            "that model.single_file_config describes it)"
        )


def _class(qualified: str) -> Any:
    library, name = qualified.split(".")
    return getattr(importlib.import_module(library), name)


def _stated_prediction(where: str, single_file_config: str | None) -> dict[str, str]:
    """The prediction type a single file's own metadata states, where no config says it.

    Without a config diffusers describes every SD 2.x file as the 768-v model (v-prediction); a file with
    `modelspec.architecture` (kohya's, loratk's) says whether it is the 512 epsilon model instead.
    """
    if single_file_config:
        return {}
    from loratk.models.detection import detect_model

    return {"prediction_type": detect_model(where).prediction_type}


def load_model(
    family: ModelFamily,
    path: str,
    *,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> DiffusionModel:
    """Load every part of a `family` model in fp32 on the CPU; `freeze_and_cast` then places them."""
    from diffusers import AutoencoderKL, DDPMScheduler

    names = ("unet", "vae", *family.text_encoder_names, *family.tokenizer_names)
    try:
        where = resolve_model_path(path)
        refuse_pickle(path, where)
        if is_single_file(where):
            if not Path(where).is_file():
                raise FileNotFoundError(f"{where}: no such checkpoint file")
            kwargs = {"config": resolve_model_path(single_file_config)} if single_file_config else {}
            pipe = _class(f"diffusers.{family.pipeline_class}").from_single_file(where, **kwargs)
            parts = {name: getattr(pipe, name) for name in names}
            parts["noise_scheduler"] = DDPMScheduler.from_config(
                pipe.scheduler.config, **_stated_prediction(where, single_file_config)
            )
        else:
            common = dict(revision=revision)
            weights = dict(common, variant=variant)
            parts = {}
            for name, qualified in family.component_classes().items():
                options = common if name in family.tokenizer_names else weights
                parts[name] = _class(qualified).from_pretrained(where, subfolder=name, **options)
            parts["noise_scheduler"] = DDPMScheduler.from_pretrained(where, subfolder="scheduler", **common)
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
            f"model.path = {path!r}: could not load the {family.label} model: {err}\n  hint: {hint}"
        ) from err
    check_all_weights_loaded(parts, where)
    return DiffusionModel(
        family=family,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders={n: parts[n] for n in family.text_encoder_names},
        tokenizers={n: parts[n] for n in family.tokenizer_names},
        noise_scheduler=parts["noise_scheduler"],
        source=path,
    )


def build_pipeline(model: DiffusionModel, scheduler: Any) -> Any:
    """The family's diffusers pipeline over the parts of `model`, as they are: no copy, no reload.

    During training these are the live UNet (with its LoRA) and the frozen VAE and text encoders.
    """
    pipeline = _class(f"diffusers.{model.family.pipeline_class}")
    pipe = pipeline(
        vae=model.vae,
        unet=model.unet,
        scheduler=scheduler,
        **model.text_encoders,
        **model.tokenizers,
        **model.family.pipeline_options(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_lora(
    family: ModelFamily,
    folder: Path,
    layers: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, dict[str, Any]],
) -> None:
    """Write LoRA layers (PEFT keys, by model part) in the diffusers layout, with each part's LoRA config,
    through the family pipeline's own `save_lora_weights`."""
    pipeline = _class(f"diffusers.{family.pipeline_class}")
    kwargs = {f"{part}_lora_layers": sd for part, sd in layers.items()}
    kwargs.update({f"{part}_lora_adapter_metadata": config for part, config in configs.items()})
    pipeline.save_lora_weights(folder, **kwargs)


def families() -> dict[str, ModelFamily]:
    """Every supported family by name."""
    from loratk.models.sd import SD1, SD2
    from loratk.models.sdxl import SDXL

    return {family.name: family for family in (SDXL, SD1, SD2)}


def family_of(name: str) -> ModelFamily:
    """The family object for a `model.family` name."""
    known = families()
    if name not in known:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(known)}")
    return known[name]


def family_for_model(
    path: str,
    requested: str = "auto",
    *,
    single_file_config: str | None = None,
    revision: str | None = None,
) -> ModelFamily:
    """The family of the model at `path`, read from its files (`models.detection`); an explicit `requested`
    family is checked against them (`ModelLoadError` when they disagree)."""
    from loratk.models.detection import resolve_family

    family, _ = resolve_family(path, requested, single_file_config=single_file_config, revision=revision)
    return family


# ---------------------------------------------------------------- placing the parts


def freeze_and_cast(
    model: DiffusionModel, device: torch.device, weight_dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()
) -> None:
    """Freeze every weight and move it to `device` in the mixed-precision dtype.

    The VAE never runs in fp16 (the SDXL VAE overflows to NaN there): it stays fp32 under fp16, bf16 under bf16.
    Parts named in `keep_fp32` (fully trained ones) stay in fp32, never rounded through the mixed dtype.
    """
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
    for name, module in model.parts.items():
        dtype = vae_dtype if name == "vae" else weight_dtype
        dtype = torch.float32 if name in keep_fp32 else dtype
        module.requires_grad_(False)
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)


def frozen_parts(model: DiffusionModel) -> tuple[str, ...]:
    """The parts that only encode (VAE, text encoders): what caches can stand in for."""
    return ("vae", *model.text_encoders)


def offload_frozen_encoders(
    model: DiffusionModel, device: torch.device | str = "cpu", names: Sequence[str] | None = None
) -> list[str]:
    """Move the VAE and the text encoders to `device` (the CPU by default), unless they train.

    Call once latents and text embeddings are cached: from then on training needs only the UNet on the
    accelerator. Sampling still needs them, so a sampler must move them back (or run where they are).
    Returns the names of the parts moved.
    """
    moved = []
    for name in frozen_parts(model) if names is None else names:
        module = model.parts.get(name)
        if module is None or any(p.requires_grad for p in module.parameters()):
            continue
        module.to(device)
        moved.append(name)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


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
