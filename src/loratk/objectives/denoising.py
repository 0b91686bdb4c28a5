"""The denoising step every objective shares: encode a batch, noise it, predict, per-sample loss.

Family specifics (prompt encoding, extra conditioning, the UNet call) come from the model's family object.
"""

from __future__ import annotations

from typing import Any

import torch

from loratk.core.diffusion_math import (
    apply_noise_offset,
    compute_min_snr_weights,
    compute_noisy_latents,
    compute_per_sample_mse,
    compute_snr,
    compute_target,
)


class Denoiser:
    """Holds the (prepared) model parts and the loss options; turns batches into per-sample losses."""

    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        weight_dtype: torch.dtype,
        prediction_type: str | None = None,
        noise_offset: float = 0.0,
        min_snr_gamma: float | None = None,
        train_text_encoders: bool = False,
    ):
        self.model = model
        self.device = device
        self.weight_dtype = weight_dtype
        scheduler_type = model.noise_scheduler.config.prediction_type
        self.prediction_type = prediction_type or scheduler_type
        self.noise_offset = noise_offset
        self.min_snr_gamma = min_snr_gamma
        self.train_text_encoders = train_text_encoders
        self.alphas_cumprod = model.noise_scheduler.alphas_cumprod.to(device)
        self.num_train_timesteps = model.noise_scheduler.config.num_train_timesteps

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE-encode [B, 3, H, W] pixels into scaled latents [B, 4, H/8, W/8] (no grad)."""
        vae = self.model.vae
        with torch.no_grad():
            pixels = pixel_values.to(self.device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def encode_latent_dist(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE-encode [B, 3, H, W] pixels into the scaled latent distribution: (mean, std), each [B, 4, H/8, W/8].

        What the latent cache stores; `mean + std * noise` is a draw as `encode_latents` makes one.
        """
        vae = self.model.vae
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(self.device, dtype=vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        return dist.mean * scale, dist.std * scale

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text conditioning of `captions` (what the text-embedding cache stores)."""
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            return self.model.family.encode_prompts(self.model, captions, self.device)

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch of pixels/captions (or already-cached latents/embeddings) -> UNet inputs:
        `latents`, `conditioning` (text and batch conditioning by name) and `noise_seeds` when given."""
        family = self.model.family
        latents = (
            batch["latents"].to(self.device)
            if "latents" in batch
            else self.encode_latents(batch["pixel_values"])
        )
        if all(key in batch for key in family.conditioning_keys):
            conditioning = {key: batch[key].to(self.device) for key in family.conditioning_keys}
        else:
            conditioning = self.encode_captions(batch["captions"])
        # A dropped caption trains the unconditional case as the family's pipeline samples it: SDXL's feeds
        # zeros, not the encoded empty prompt, for an empty negative prompt (`force_zeros_for_empty_prompt`).
        empty = [caption == "" for caption in batch.get("captions", ())]
        if any(empty) and family.zero_empty_prompts():
            keep = torch.tensor([not e for e in empty], device=latents.device)
            conditioning = {
                key: value * keep.view(-1, *[1] * (value.ndim - 1)).to(value.dtype)
                for key, value in conditioning.items()
            }
        conditioning.update({k: v.to(self.device) for k, v in family.batch_conditioning(batch).items()})
        inputs: dict[str, Any] = {"latents": latents, "conditioning": conditioning}
        if "noise_seeds" in batch:
            inputs["noise_seeds"] = batch["noise_seeds"]
        return inputs

    def draw_noise(self, latents: torch.Tensor, seeds: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the noise offset) and timesteps. Per sample from its own seed when given, so a sample's
        noise does not depend on its batch or process; else from the (per-step reseeded) global RNG."""
        batch_size, channels = latents.shape[:2]
        if seeds is None:
            noise = torch.randn_like(latents)
            offset = torch.randn(batch_size, channels, 1, 1, device=latents.device)
            timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), device=latents.device)
        else:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(
                latents.device
            )
            offset = torch.stack([torch.randn(channels, 1, 1, generator=g) for g in gens]).to(latents.device)
            timesteps = torch.cat(
                [torch.randint(0, self.num_train_timesteps, (1,), generator=g) for g in gens]
            ).to(latents.device)
        if self.noise_offset:
            noise = apply_noise_offset(noise, self.noise_offset, offset)
        return noise, timesteps

    def per_sample_loss(
        self,
        inputs: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        *,
        weighted: bool = True,
    ) -> torch.Tensor:
        """Noise the latents, predict with the UNet, return the (Min-SNR weighted) MSE per sample [B].

        Noise and timesteps are drawn (see `draw_noise`) unless given (a fixed evaluation set passes them);
        `weighted=False` gives the plain MSE, comparable across runs whatever their loss weighting.
        """
        latents = inputs["latents"].float()
        if noise is None or timesteps is None:
            drawn_noise, drawn_timesteps = self.draw_noise(latents, inputs.get("noise_seeds"))
            noise = drawn_noise if noise is None else noise
            timesteps = drawn_timesteps if timesteps is None else timesteps
        noisy = compute_noisy_latents(latents, noise, timesteps, self.alphas_cumprod)
        prediction = self.model.family.predict(
            self.model.unet, noisy, timesteps, inputs["conditioning"], self.weight_dtype
        )
        target = compute_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        loss = compute_per_sample_mse(prediction, target)
        if self.min_snr_gamma and weighted:
            snr = compute_snr(timesteps, self.alphas_cumprod)
            loss = loss * compute_min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)
        return loss
