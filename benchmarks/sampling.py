"""Sampling speed: seconds per image of loratk's sampling path on an SDXL with random weights.

    python benchmarks/sampling.py                  # CPU: tiny SDXL, 64x64, 4 steps, batch 1 and 4
    python benchmarks/sampling.py --full-size      # GPU: SDXL-shaped UNet, VAE and text encoders, 1024², 30 steps

The model is built from configs (no download) as a `DiffusionModel`, placed by `freeze_and_cast` in the
precision `loratk sample` uses (bf16 on a GPU that has it, fp32 on a CPU), and rendered through
`loratk.sampling.pipeline`: the family's pipeline over the parts, Euler, one seeded generator per image, the
VAE decode that never runs in fp16. Text encoding, 30 UNet steps with classifier-free guidance (the UNet sees
2x the batch) and the decode are all timed; the decode is also timed alone.

Random weights make noise, not pictures, but the same work: every step runs the full UNet.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_full_size_sdxl(device: torch.device, dtype: torch.dtype = torch.float32, *, seed: int = 0) -> Any:
    """An SDXL `DiffusionModel` with SDXL base's shapes (UNet 2.57 B, VAE 84 M, text encoders 123 M + 695 M
    parameters) and random weights, built directly on `device` in `dtype` (no fp32 copy first: 13 GB less
    to hold under a memory cap). The tokenizers are the tiny byte-level ones: prompts tokenize to ids that
    every vocabulary holds, and the encoders still run all 77 positions."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratk.models.base_configs import (
        SDXL_BASE_TEXT_ENCODER_2_CONFIG,
        SDXL_BASE_TEXT_ENCODER_CONFIG,
        SDXL_BASE_UNET_CONFIG,
        SDXL_BASE_VAE_CONFIG,
    )
    from loratk.models.tiny import build_tiny_tokenizer

    tokenizers = {"tokenizer": build_tiny_tokenizer(), "tokenizer_2": build_tiny_tokenizer()}

    def text_config(config: dict[str, Any], tokenizer: Any) -> Any:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextConfig(**config, **ids)

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
            vae = AutoencoderKL(**SDXL_BASE_VAE_CONFIG)
            encoders = {
                "text_encoder": CLIPTextModel(
                    text_config(SDXL_BASE_TEXT_ENCODER_CONFIG, tokenizers["tokenizer"])
                ),
                "text_encoder_2": CLIPTextModelWithProjection(
                    text_config(SDXL_BASE_TEXT_ENCODER_2_CONFIG, tokenizers["tokenizer_2"])
                ),
            }
    finally:
        torch.set_default_dtype(default_dtype)
    return _diffusion_model(unet, vae, encoders, tokenizers)


def build_tiny_sdxl() -> Any:
    """loratk's tiny random SDXL (`builtin:tiny-sdxl`'s parts), on the CPU."""
    from loratk.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    tokenizers = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}
    return _diffusion_model(pipe.unet, pipe.vae, encoders, tokenizers)


def _diffusion_model(unet: Any, vae: Any, encoders: dict[str, Any], tokenizers: dict[str, Any]) -> Any:
    from diffusers import DDPMScheduler

    from loratk.models.family import DiffusionModel
    from loratk.models.sdxl import SDXL

    # SDXL base's scheduler config; sampling schedulers are built from it (`build_scheduler`).
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return DiffusionModel(
        family=SDXL,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        source="benchmark:random-weights",
    )


def default_precision(device: torch.device) -> str:
    """What `loratk sample` picks: bf16 on a GPU that has it, else fp16; fp32 on a CPU."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_sampling_pipeline(
    model: Any, device: torch.device, precision: str, scheduler: str = "euler"
) -> Any:
    """Place the parts as `loratk sample` does and build the family pipeline over them."""
    from loratk.core.precision import resolve_dtype
    from loratk.models.family import freeze_and_cast
    from loratk.sampling.pipeline import build_pipeline

    freeze_and_cast(model, device, resolve_dtype(precision))
    return build_pipeline(model, scheduler=scheduler)


def time_batch(
    pipe: Any,
    *,
    batch_size: int,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    rounds: int,
    device: torch.device,
) -> dict[str, Any]:
    """Render `batch_size` images (one batch: same prompt, seeds 0..B-1) `rounds` times after one short
    warm-up render at this batch size; return the medians, and the VAE decode of such a batch alone."""
    from loratk.sampling.pipeline import decode_latents, generate_images
    from loratk.sampling.specs import ImageSpec

    def specs(num_steps: int) -> list[ImageSpec]:
        spec = ImageSpec("a photo of a benchmark", "", width, height, 0, num_steps, guidance)
        return [ImageSpec(**{**spec.__dict__, "seed": seed}) for seed in range(batch_size)]

    def render(num_steps: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            images = [image for _, image in generate_images(pipe, specs(num_steps), batch_size=batch_size)]
        _synchronize(device)
        assert len(images) == batch_size and images[0].size == (width, height)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    render(min(2, steps))  # first kernels and the allocator, at this batch's shapes
    seconds = statistics.median(render(steps) for _ in range(rounds))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, 4, height // 8, width // 8, generator=generator)  # [B, 4, H/8, W/8]
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        decode_latents(pipe.vae, latents.to(device), pipe.image_processor)
    _synchronize(device)
    decode = time.perf_counter() - start
    row: dict[str, Any] = {
        "batch_size": batch_size,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "s_per_batch": seconds,
        "s_per_image": seconds / batch_size,
        "images_per_s": batch_size / seconds,
        "vae_decode_s_per_image": decode / batch_size,
        "unet_steps_per_s": steps / max(seconds - decode, 1e-9),  # text encoding counted in, it is tiny
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def run_sampling(
    *,
    full_size: bool,
    device: torch.device,
    batch_sizes: tuple[int, ...] = (1, 4),
    size: int | None = None,
    steps: int | None = None,
    guidance: float = 7.0,
    rounds: int = 1,
    precision: str | None = None,
) -> dict[str, Any]:
    """Build the model, then time every batch size; one row per batch size."""
    size = size or (1024 if full_size else 64)
    steps = steps or (30 if full_size else 4)
    precision = precision or default_precision(device)
    start = time.perf_counter()
    if full_size:
        from loratk.core.precision import resolve_dtype

        model = build_full_size_sdxl(device, resolve_dtype(precision))
    else:
        model = build_tiny_sdxl()
    pipe = build_sampling_pipeline(model, device, precision)
    build_s = time.perf_counter() - start
    rows = []
    try:
        for batch_size in batch_sizes:
            rows.append(
                time_batch(
                    pipe,
                    batch_size=batch_size,
                    width=size,
                    height=size,
                    steps=steps,
                    guidance=guidance,
                    rounds=rounds,
                    device=device,
                )
            )
    finally:
        del pipe, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": "SDXL-shaped (random)" if full_size else "tiny SDXL (random)",
        "precision": precision,
        "scheduler": "euler",
        "build_s": build_s,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", action="store_true", help="SDXL-shaped random model (needs a GPU)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: as `loratk sample`")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--size", type=int, help="image side (default: 1024 full size, 64 tiny)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 30 full size, 4 tiny)")
    parser.add_argument("--rounds", type=int, default=1, help="timed renders per batch size (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.full_size and device.type != "cuda":
        print(
            "--full-size is meant for a GPU (30 full-size SDXL steps on a CPU take many minutes)",
            file=sys.stderr,
        )
        return 2
    result = run_sampling(
        full_size=args.full_size,
        device=device,
        batch_sizes=tuple(args.batch_sizes),
        size=args.size,
        steps=args.steps,
        rounds=args.rounds,
        precision=args.precision,
    )
    print(f"{result['model']}, {device}, {result['precision']}, {result['scheduler']}")
    print("| batch | size | steps | s/image | images/s | VAE decode s/image | UNet steps/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(
            f"| {row['batch_size']} | {row['width']}x{row['height']} | {row['steps']} | {row['s_per_image']:.3f} "
            f"| {row['images_per_s']:.2f} | {row['vae_decode_s_per_image']:.3f} | {row['unet_steps_per_s']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
