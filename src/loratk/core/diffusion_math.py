"""Pure tensor math of the diffusion loss: noising, targets, SNR weights, noise offset, prior preservation.

Tensors in, tensors out: no models, no state. Every function is unit-tested against hand-computed values.
"""

from __future__ import annotations

import torch


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[timesteps] shaped to broadcast against `like`: [B, 1, 1, 1]."""
    out = values.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return out.view(-1, *([1] * (like.ndim - 1)))


def compute_noisy_latents(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise (the DDPM forward process)."""
    a = _gather(alphas_cumprod, timesteps, latents)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def compute_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity v = sqrt(a) * noise - sqrt(1 - a) * x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, timesteps, latents)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def compute_snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per sample: [B]."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1 - a)


def compute_min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def apply_noise_offset(noise: torch.Tensor, offset: float, offset_noise: torch.Tensor) -> torch.Tensor:
    """Noise offset: add a per-sample, per-channel constant (`offset_noise` is [B, C, 1, 1]) scaled by `offset`."""
    return noise + offset * offset_noise


def compute_per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in fp32: [B]."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def compute_prior_preservation_loss(
    instance_loss: torch.Tensor, class_loss: torch.Tensor, prior_loss_weight: float
) -> torch.Tensor:
    """DreamBooth loss: instance loss + prior_loss_weight * class loss (both already reduced)."""
    return instance_loss + prior_loss_weight * class_loss
