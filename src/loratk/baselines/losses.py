"""The GAN objectives as pure tensor math: DCGAN's (non-saturating) losses on logits, WGAN-GP's critic and
generator losses with the gradient penalty, and the critic-step schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def compute_dcgan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), on logits [B]."""
    ones, zeros = torch.ones_like(real_logits), torch.zeros_like(fake_logits)
    return F.binary_cross_entropy_with_logits(real_logits, ones) + F.binary_cross_entropy_with_logits(
        fake_logits, zeros
    )


def compute_dcgan_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)) (the DCGAN paper's)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def compute_wasserstein_estimate(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """E[D(x)] - E[D(G(z))]: the critic's estimate of the Wasserstein-1 distance."""
    return real_scores.mean() - fake_scores.mean()


def compute_gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """WGAN-GP's penalty E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = alpha x + (1 - alpha) G(z).

    `alpha` [B] in [0, 1], one per pair. The graph is kept (create_graph), so the penalty trains the critic.
    """
    alpha = alpha.reshape(-1, *([1] * (real.dim() - 1)))
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return (grads.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def generator_step_due(critic_step: int, critic_steps: int) -> bool:
    """Whether the generator steps after critic step `critic_step` (1-based): once every `critic_steps`."""
    return critic_step % critic_steps == 0
