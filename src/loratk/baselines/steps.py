"""One discriminator (critic) step and one generator step, for DCGAN's and WGAN-GP's objectives, with or
without diffusion augmentation. A non-finite loss skips its update (the loop counts and stops on a run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from loratk.baselines.augment import DiffusionAugment
from loratk.baselines.losses import (
    compute_dcgan_d_loss,
    compute_dcgan_g_loss,
    compute_gradient_penalty,
    compute_wasserstein_estimate,
)

Loss = Literal["dcgan", "wgan-gp"]


@dataclass
class StepOutput:
    finite: bool
    logs: dict[str, float]


class GanSteps:
    """The two updates of a GAN. `backward` is the engine's (the accelerator's); nothing else is."""

    def __init__(
        self,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        *,
        loss: Loss,
        latent_dim: int,
        gp_weight: float = 10.0,
        augment: DiffusionAugment | None = None,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ):
        self.generator, self.discriminator = generator, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.loss, self.latent_dim, self.gp_weight = loss, latent_dim, gp_weight
        self.augment, self.backward = augment, backward

    def _sample_latents(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device)  # [B, latent_dim]

    def _score(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """D on real and fake (diffused at one shared draw of t per pair, as the paper), and the critic
        function the gradient penalty differentiates (at the same t)."""
        if self.augment is None:
            return self.discriminator(real), self.discriminator(fake), self.discriminator
        t = self.augment.sample_timesteps(real.shape[0], real.device)
        real_t, level = self.augment.apply(real, t)
        fake_t, _ = self.augment.apply(fake, t)

        def critic(x: torch.Tensor) -> torch.Tensor:
            return self.discriminator(x, level)

        return critic(real_t), critic(fake_t), critic, real_t, fake_t

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(loss.detach()))
        if finite:
            self.backward(loss)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite

    def discriminator_step(self, real: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            fake = self.generator(self._sample_latents(real.shape[0], real.device))
        scored = self._score(real, fake)
        real_out, fake_out, critic = scored[:3]
        logs: dict[str, torch.Tensor] = {}
        if self.loss == "dcgan":
            loss = compute_dcgan_d_loss(real_out, fake_out)
        else:
            real_in, fake_in = (scored[3], scored[4]) if len(scored) > 3 else (real, fake)
            alpha = torch.rand(real.shape[0], device=real.device)
            penalty = compute_gradient_penalty(critic, real_in, fake_in, alpha)
            wasserstein = compute_wasserstein_estimate(real_out, fake_out)
            loss = -wasserstein + self.gp_weight * penalty
            logs |= {"train/wasserstein": wasserstein.detach(), "train/gradient_penalty": penalty.detach()}
        logs["train/d_loss"] = loss.detach()
        logs["train/d_real_sign"] = torch.sign(real_out.detach()).mean()
        finite = self._update(self.d_optimizer, loss)
        if self.augment is not None and finite:
            self.augment.observe(real_out)
        return StepOutput(finite, {k: float(v) for k, v in logs.items()})

    def generator_step(self, batch_size: int, device: torch.device) -> StepOutput:
        for p in self.discriminator.parameters():  # D's gradients from this loss are never used
            p.requires_grad_(False)
        try:
            fake = self.generator(self._sample_latents(batch_size, device))
            if self.augment is None:
                fake_out = self.discriminator(fake)
            else:
                t = self.augment.sample_timesteps(batch_size, device)
                fake_t, level = self.augment.apply(fake, t)
                fake_out = self.discriminator(fake_t, level)
            loss = compute_dcgan_g_loss(fake_out) if self.loss == "dcgan" else -fake_out.mean()
            finite = self._update(self.g_optimizer, loss)
        finally:
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
        return StepOutput(finite, {"train/g_loss": float(loss.detach())})

    def state_logs(self) -> dict[str, float]:
        """The augmentation's state for metrics.jsonl: the timestep range [0, T] and its signal r_d."""
        if self.augment is None:
            return {}
        logs = {"aug/t_limit": float(self.augment.t_limit), "aug/p": self.augment.p}
        if self.augment.last_signal is not None:
            logs["aug/r_d"] = self.augment.last_signal
        return logs
