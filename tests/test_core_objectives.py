"""The loss math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from loratk.core.diffusion_math import (
    apply_noise_offset,
    compute_min_snr_weights,
    compute_noisy_latents,
    compute_per_sample_mse,
    compute_prior_preservation_loss,
    compute_snr,
    compute_target,
)

# Two timesteps with alpha_bar = 0.64 and 0.2.
ALPHAS = torch.tensor([0.9, 0.64, 0.5, 0.2])
T = torch.tensor([1, 3])
LATENTS = torch.tensor([[[[1.0]]], [[[2.0]]]])  # [2, 1, 1, 1]
NOISE = torch.tensor([[[[0.5]]], [[[-1.0]]]])


def test_noisy_latents():
    out = compute_noisy_latents(LATENTS, NOISE, T, ALPHAS)
    # sqrt(.64)*1 + sqrt(.36)*.5 = .8 + .3 ; sqrt(.2)*2 + sqrt(.8)*-1
    expected = torch.tensor([1.1, math.sqrt(0.2) * 2 - math.sqrt(0.8)])
    torch.testing.assert_close(out.flatten(), expected)


def test_epsilon_target_is_the_noise():
    assert torch.equal(compute_target(LATENTS, NOISE, T, ALPHAS, "epsilon"), NOISE)


def test_v_target():
    out = compute_target(LATENTS, NOISE, T, ALPHAS, "v_prediction").flatten()
    # .8*.5 - .6*1 = -.2 ; sqrt(.2)*-1 - sqrt(.8)*2
    expected = torch.tensor([-0.2, -math.sqrt(0.2) - 2 * math.sqrt(0.8)])
    torch.testing.assert_close(out, expected)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        compute_target(LATENTS, NOISE, T, ALPHAS, "sample")


def test_snr_and_min_snr_weights():
    snr = compute_snr(T, ALPHAS)
    torch.testing.assert_close(snr, torch.tensor([0.64 / 0.36, 0.25]))
    # gamma = 1: min(1.777, 1)/1.777 = 0.5625 ; min(.25, 1)/.25 = 1
    torch.testing.assert_close(compute_min_snr_weights(snr, 1.0, "epsilon"), torch.tensor([0.5625, 1.0]))
    # v: min(snr, 1) / (snr + 1) = 1/2.777 = 0.36 ; .25/1.25 = .2
    torch.testing.assert_close(compute_min_snr_weights(snr, 1.0, "v_prediction"), torch.tensor([0.36, 0.2]))


def test_noise_offset_adds_a_scaled_constant_per_channel():
    noise = torch.zeros(1, 2, 2, 2)
    offset = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    out = apply_noise_offset(noise, 0.1, offset)
    assert torch.allclose(out[0, 0], torch.full((2, 2), 0.1))
    assert torch.allclose(out[0, 1], torch.full((2, 2), -0.2))


def test_per_sample_mse_and_prior_loss():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    torch.testing.assert_close(compute_per_sample_mse(pred, target), torch.tensor([2.5, 5.0]))
    total = compute_prior_preservation_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5)
    assert total.item() == pytest.approx(3.5)


def test_a_samples_noise_depends_on_its_seed_not_on_its_batch(tiny_sdxl_dir):
    from loratk.models.sdxl import load_sdxl
    from loratk.objectives.denoising import Denoiser

    denoiser = Denoiser(load_sdxl(str(tiny_sdxl_dir)), device=torch.device("cpu"), weight_dtype=torch.float32)
    latents = torch.zeros(3, 4, 8, 8)
    noise, steps = denoiser.draw_noise(latents, [11, 22, 33])
    alone, alone_steps = denoiser.draw_noise(latents[1:2], [22])
    assert torch.equal(noise[1:2], alone) and steps[1] == alone_steps[0]
    assert not torch.equal(noise[0], noise[1])
