"""Diffusion-GAN's diffusion augmentation (Wang et al. 2022): before the discriminator sees an image, real or
generated, it is diffused by the forward Gaussian process at a timestep t drawn from [0, T]; the
discriminator is told t. T adapts: every few discriminator steps the overfitting signal
r_d = E[sign(D(x_real))] is compared with a target; above it (the discriminator is too sure of the real
images) T grows, below it T shrinks (the paper's rule, as in StyleGAN2-ADA's probability p)."""

from __future__ import annotations

from typing import Any

import torch


def compute_alphas_bar(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s) for t = 0 .. num_steps, linear betas; [num_steps + 1], entry 0 is 1 (clean)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).float()


def diffuse(x: torch.Tensor, t: torch.Tensor, alphas_bar: torch.Tensor, noise: torch.Tensor, std: float):
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) * std * noise; x [B, C, H, W], t [B] integer steps."""
    abar = alphas_bar.to(x.device)[t].reshape(-1, 1, 1, 1).to(x.dtype)
    return abar.sqrt() * x + (1 - abar).sqrt() * std * noise


class DiffusionAugment:
    """The adaptive timestep range and the diffusion of a batch. Its state (p and the signal gathered so far)
    is saved with the training state, so a resumed run adapts exactly as an uninterrupted one."""

    def __init__(
        self,
        *,
        t_min: int = 5,
        t_max: int = 500,
        target: float = 0.6,
        interval: int = 4,
        ada_kimg: float = 100.0,
        noise_std: float = 0.05,
        batch_size: int = 64,
    ):
        if not 0 <= t_min <= t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got {t_min} and {t_max}")
        self.t_min, self.t_max, self.target = t_min, t_max, target
        self.interval, self.noise_std = interval, noise_std
        # How far p moves per adjustment: from 0 to 1 over `ada_kimg` thousand real images (Diffusion-GAN).
        self.step_size = batch_size * interval / (ada_kimg * 1000)
        self.alphas_bar = compute_alphas_bar(t_max)
        self.p = 0.0  # where T sits in [t_min, t_max]
        self.signal_sum = 0.0
        self.signal_count = 0
        self.last_signal: float | None = None

    @property
    def t_limit(self) -> int:
        """T: timesteps are drawn from [0, T]."""
        return int(round(self.t_min + self.p * (self.t_max - self.t_min)))

    def sample_timesteps(self, batch_size: int, device: Any) -> torch.Tensor:
        """t [B], uniform over 0 .. T (from torch's global RNG, reseeded by the loop every step)."""
        return torch.randint(0, self.t_limit + 1, (batch_size,), device=device)

    def apply(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffused batch and t scaled to [0, 1] for the discriminator's conditioning."""
        noise = torch.randn_like(x)
        return diffuse(x, t, self.alphas_bar, noise, self.noise_std), t.float() / max(self.t_max, 1)

    def observe(self, real_outputs: torch.Tensor) -> bool:
        """Add one discriminator step's outputs on real images; every `interval` steps move T. Returns
        whether T was adjusted."""
        signs = torch.sign(real_outputs.detach())
        self.signal_sum += float(signs.sum()) / signs.numel()  # in float64: r_d = 0.6 is the target exactly
        self.signal_count += 1
        if self.signal_count < self.interval:
            return False
        self.last_signal = self.signal_sum / self.signal_count
        direction = (self.last_signal > self.target) - (self.last_signal < self.target)
        self.p = min(1.0, max(0.0, self.p + direction * self.step_size))
        self.signal_sum, self.signal_count = 0.0, 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "signal_sum": self.signal_sum,
            "signal_count": self.signal_count,
            "last_signal": self.last_signal,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p = float(state["p"])
        self.signal_sum = float(state["signal_sum"])
        self.signal_count = int(state["signal_count"])
        self.last_signal = state["last_signal"]
