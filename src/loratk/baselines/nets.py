"""DCGAN's generator and discriminator (Radford et al. 2016) at any power-of-two square side from 32 up.

The generator starts from a latent vector as a 4 x 4 map and doubles it with transposed convolutions
(BatchNorm, ReLU; tanh out). The discriminator halves the image down to 4 x 4 with strided convolutions
(LeakyReLU 0.2; no normalisation on its input layer) and ends in one logit. WGAN-GP's critic is the same
network without BatchNorm (per-sample layer norm or none), since the gradient penalty is per sample.
With diffusion augmentation the discriminator also reads the timestep, as one extra constant channel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "layer", "none"]


def compute_depth(resolution: int) -> int:
    """How many doublings take 4 x 4 to `resolution` (64: 4, 128: 5); raises for a bad side."""
    depth = int(math.log2(resolution)) - 2 if resolution > 0 else -1
    if resolution < 32 or 4 * 2**depth != resolution:
        raise ValueError(f"resolution must be a power of two >= 32 (64 or 128), got {resolution}")
    return depth


@dataclass(frozen=True)
class GeneratorConfig:
    """What a generator file's metadata holds, enough to rebuild the network (`build_generator`)."""

    resolution: int = 64
    latent_dim: int = 100
    width: int = 64

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C, H, W) of each sample, per-channel affine
    return nn.Identity()


class Generator(nn.Module):
    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        depth = compute_depth(config.resolution)
        channels = config.width * 2 ** (depth - 1)  # 64 px, width 64: 512 at 4 x 4
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.latent_dim, channels, 4, 1, 0, bias=False),  # [B, C, 4, 4]
            nn.BatchNorm2d(channels),
            nn.ReLU(True),
        ]
        for _ in range(depth - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),  # doubles H and W
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]  # [B, 3, R, R]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] (or [B, latent_dim, 1, 1]) -> images [B, 3, R, R] in [-1, 1]."""
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """One logit (DCGAN) or critic value (WGAN-GP) per image. `conditioned`: reads a timestep in [0, 1]."""

    def __init__(
        self, resolution: int = 64, width: int = 64, norm: Norm = "batch", conditioned: bool = False
    ):
        super().__init__()
        depth = compute_depth(resolution)
        self.conditioned = conditioned
        channels = width
        layers: list[nn.Module] = [
            nn.Conv2d(3 + int(conditioned), width, 4, 2, 1, bias=False),  # [B, w, R/2, R/2]
            nn.LeakyReLU(0.2, True),
        ]
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False),  # halves H and W
                _norm(norm, channels * 2),
                nn.LeakyReLU(0.2, True),
            ]
            channels *= 2
        layers.append(nn.Conv2d(channels, 1, 4, 1, 0, bias=False))  # [B, 1, 1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, R, R], t [B] in [0, 1] (conditioned only) -> [B]."""
        if self.conditioned:
            if t is None:
                raise ValueError("this discriminator is conditioned on the diffusion timestep: pass t")
            plane = t.to(images.dtype).reshape(-1, 1, 1, 1).expand(-1, 1, *images.shape[2:])
            images = torch.cat([images, plane], dim=1)
        return self.net(images).reshape(-1)


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN's initialisation: convolutions N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_generator(config: GeneratorConfig) -> Generator:
    generator = Generator(config)
    init_dcgan_weights(generator)
    return generator


def build_discriminator(resolution: int, width: int, *, norm: Norm, conditioned: bool) -> Discriminator:
    discriminator = Discriminator(resolution, width, norm, conditioned)
    init_dcgan_weights(discriminator)
    return discriminator
