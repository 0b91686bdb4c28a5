"""Rendering with a model family's pipeline: schedulers (never DDIM), seeded batched images, a VAE decode
that never runs in fp16, and the model state around sampling (no grad, eval, RNG forked, adapters off).

One code path serves the epoch hook (the live model, no reload), `loratk sample` and class images."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from loratk.models.family import build_pipeline as build_family_pipeline
from loratk.models.family import frozen_parts
from loratk.sampling.specs import ImageSpec, SampleError

# id -> (diffusers class, options on top of the model's own scheduler config, A1111 name). Never DDIM by
# default: it gives bad SDXL images (shared/REFERENCE.md §2).
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
}
DEFAULT_SCHEDULER = "euler"


def build_scheduler(name: str, base_config: Any, prediction_type: str | None = None) -> Any:
    """A sampling scheduler from the model's own scheduler config (timestep spacing, betas ...)."""
    import diffusers

    if name not in SCHEDULERS:
        raise SampleError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, options, _ = SCHEDULERS[name]
    if prediction_type:
        options = {**options, "prediction_type": prediction_type}
    return getattr(diffusers, cls_name).from_config(base_config, **options)


def sampler_name(scheduler: str) -> str:
    """The A1111 name of a scheduler id (`dpmpp_2m` -> `DPM++ 2M`)."""
    return SCHEDULERS[scheduler][2]


def build_pipeline(
    model: Any, *, scheduler: str = DEFAULT_SCHEDULER, prediction_type: str | None = None
) -> Any:
    """The model family's pipeline over the parts of `model`, as they are (no copy, no reload), with a
    sampling scheduler built from the model's own scheduler config.

    During training these are the live UNet (with its LoRA) and the frozen VAE and text encoders.
    """
    return build_family_pipeline(
        model, build_scheduler(scheduler, model.noise_scheduler.config, prediction_type)
    )


def decode_latents(vae: Any, latents: torch.Tensor, image_processor: Any) -> list[Image.Image]:
    """Scaled latents [B, 4, H/8, W/8] -> PIL images, never with the VAE in fp16 (see `vae_decode`)."""
    pixels = vae_decode(vae, latents)
    if not torch.isfinite(pixels).all():
        raise SampleError(
            "the decoded image is not finite (NaN/inf): the adapter may have diverged (check train/loss)"
        )
    return image_processor.postprocess(pixels.float(), output_type="pil")


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, 4, H/8, W/8] -> pixels [B, 3, H, W] in [-1, 1], under `torch.no_grad`.

    Never in fp16 (SDXL's VAE gives NaN there): an fp16 VAE is upcast to fp32 for the decode and put back
    afterwards. `loratk plan` runs this very function on fake tensors for the decode's memory.
    """
    upcast = vae.dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    try:
        config = vae.config
        latents = latents.to(vae.device, dtype=vae.dtype)
        if (
            getattr(config, "latents_mean", None) is not None
            and getattr(config, "latents_std", None) is not None
        ):
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with torch.no_grad():
            return vae.decode(latents).sample
    finally:
        if upcast:
            vae.to(torch.float16)


def _batches(specs: Sequence[ImageSpec], batch_size: int) -> Iterator[list[ImageSpec]]:
    """Consecutive specs that differ only in their seed share a batch (one generator per image)."""
    batch: list[ImageSpec] = []
    for spec in specs:
        same = batch and dataclasses.replace(batch[0], seed=spec.seed) == spec
        if batch and (not same or len(batch) >= batch_size):
            yield batch
            batch = []
        batch.append(spec)
    if batch:
        yield batch


def generate_images(
    pipe: Any,
    specs: Sequence[ImageSpec],
    *,
    batch_size: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[tuple[ImageSpec, Image.Image]]:
    """Render `specs` in order and yield (spec, image) as they are done.

    Each image has its own CPU `torch.Generator` seeded with its seed, so an image depends on its seed only
    (not on the batch, the device or the global RNG). `progress(n)` is called after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for batch in _batches(specs, batch_size):
        first = batch[0]
        latents = pipe(
            prompt=first.prompt,
            negative_prompt=first.negative_prompt or None,
            num_images_per_prompt=len(batch),
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in batch],
            output_type="latent",
        ).images
        images = decode_latents(pipe.vae, latents, pipe.image_processor)
        if progress is not None:
            progress(len(batch))
        yield from zip(batch, images, strict=True)


@contextlib.contextmanager
def sampling_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """No grad, eval mode, and a forked RNG; afterwards every train/eval flag and RNG is as it was and
    the memory is freed. Sampling during training therefore changes nothing the training sees.
    """
    import numpy as np

    flags = {m: m.training for module in modules for m in module.modules()}
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for module in modules:
                module.eval()
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)
        free_memory()


@contextlib.contextmanager
def parts_on_device(model: Any, device: torch.device) -> Iterator[None]:
    """Bring parts that were offloaded after caching (VAE, text encoders) to `device` for the duration."""
    moved = []
    for name in frozen_parts(model):
        module = model.parts.get(name)
        if module is not None and module.device != device:
            moved.append((module, module.device))
            module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def adapters_disabled(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: every PEFT adapter layer in `modules` is switched off, then restored as it was
    (peft's toggle also flips `requires_grad`; that is restored too).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = {layer: layer.disable_adapters for layer in layers}
    requires_grad = {p: p.requires_grad for module in modules for p in module.parameters()}
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(not was_disabled[layer])
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def model_modules(model: Any) -> list[torch.nn.Module]:
    return list(model.parts.values())
