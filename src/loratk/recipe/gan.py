"""The `[gan]` section of methods 'dcgan' and 'wgan-gp': the networks, their optimizers, the critic schedule,
Diffusion-GAN's augmentation, samples and per-epoch metrics. Unset learning rates, betas and critic steps
take the papers' values for the method (`GanConfig.resolved`). Epochs, batch size, resume and logging come
from [train], the images from [data]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from loratk.recipe.sections import Section

# The papers' settings (REFERENCE.md §7): DCGAN (Radford et al. 2016), WGAN-GP (Gulrajani et al. 2017).
PAPER_DEFAULTS = {
    "dcgan": {"g_lr": 2e-4, "d_lr": 2e-4, "betas": (0.5, 0.999), "critic_steps": 1, "d_norm": "batch"},
    "wgan-gp": {"g_lr": 1e-4, "d_lr": 1e-4, "betas": (0.0, 0.9), "critic_steps": 5, "d_norm": "layer"},
}


class GanConfig(Section):
    resolution: int = Field(64, description="square side, a power of two >= 32 (64 or 128 as in the papers)")
    latent_dim: int = Field(100, gt=0, description="size of the generator's input vector z ~ N(0, I)")
    g_width: int = Field(64, gt=0, description="generator channels at full resolution (x2 per halving)")
    d_width: int = Field(64, gt=0, description="discriminator channels after its first layer")
    d_norm: Literal["batch", "layer", "none"] | None = Field(
        None, description="discriminator normalisation; default: batch (dcgan), layer (wgan-gp, never batch)"
    )
    optimizer: Literal["adam", "rmsprop"] = "adam"
    g_lr: float | None = Field(None, gt=0, description="default: 2e-4 (dcgan), 1e-4 (wgan-gp)")
    d_lr: float | None = Field(None, gt=0, description="default: as g_lr")
    betas: tuple[float, float] | None = Field(None, description="Adam betas; default (0.5, 0.999) / (0, 0.9)")
    lr_decay: Literal["none", "exponential"] = Field(
        "none", description="exponential: x decay_rate per decay_steps"
    )
    decay_rate: float = Field(0.95, gt=0, le=1)
    decay_steps: int = Field(1000, gt=0, description="steps of each network per decay_rate factor")
    critic_steps: int | None = Field(
        None, gt=0, description="D steps per G step; default 1 (dcgan), 5 (wgan-gp)"
    )
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP's gradient-penalty weight lambda")
    diffusion: bool = Field(False, description="Diffusion-GAN's diffusion augmentation with an adaptive T")
    diffusion_t_min: int = Field(5, ge=0, description="the smallest T of the adaptive range [0, T]")
    diffusion_t_max: int = Field(500, gt=0, description="the largest T (linear betas 1e-4 .. 2e-2 over it)")
    diffusion_target: float = Field(0.6, gt=-1, lt=1, description="target of r_d = E[sign(D(real))]")
    diffusion_interval: int = Field(4, gt=0, description="D steps between adjustments of T")
    diffusion_kimg: float = Field(100.0, gt=0, description="thousand real images for T to cross its range")
    diffusion_noise_std: float = Field(0.05, gt=0, description="sigma of the added Gaussian noise")
    sample_seeds: list[int] = Field(
        default_factory=lambda: list(range(16)), min_length=1, description="one fixed latent vector per seed"
    )
    sample_every_n_epochs: int = Field(1, gt=0)
    interpolation_steps: int = Field(
        8, ge=0, description="images in the latent-interpolation strip (0 = none)"
    )
    eval_every_n_epochs: int = Field(1, ge=0, description="FID/KID/IS every N epochs (0 = never)")
    eval_images: int = Field(256, ge=2, description="generated images per evaluation")
    inception: str = Field(
        "torch-fidelity",
        description='FID/KID/IS features: "torch-fidelity", a .pth file, builtin:tiny-inception, "" = none',
    )

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        if value < 32 or value & (value - 1):
            raise ValueError(f"must be a power of two >= 32 (64 or 128), got {value}")
        return value

    @model_validator(mode="after")
    def _check_diffusion(self) -> GanConfig:
        if self.diffusion_t_min > self.diffusion_t_max:
            raise ValueError(
                f"diffusion_t_min ({self.diffusion_t_min}) is larger than diffusion_t_max ({self.diffusion_t_max})"
            )
        return self

    def resolved(self, method: str) -> dict[str, object]:
        """Learning rates, betas, critic steps and D normalisation: as given, else the method's papers'."""
        paper = PAPER_DEFAULTS[method]
        g_lr = self.g_lr if self.g_lr is not None else paper["g_lr"]
        return {
            "g_lr": g_lr,
            "d_lr": self.d_lr
            if self.d_lr is not None
            else (g_lr if self.g_lr is not None else paper["d_lr"]),
            "betas": self.betas if self.betas is not None else paper["betas"],
            "critic_steps": self.critic_steps if self.critic_steps is not None else paper["critic_steps"],
            "d_norm": self.d_norm if self.d_norm is not None else paper["d_norm"],
        }
