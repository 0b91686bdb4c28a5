"""The validation loss: the denoising loss on held-out images at fixed noise and fixed timesteps.

Each image gets `timesteps_per_image` timesteps, one from each equal stretch of the schedule, and their noise,
all drawn once from (seed, image) on the CPU. The same images and seed therefore give the same numbers in
every epoch, in every run and after a resume, on any device; the loss is the plain MSE (no Min-SNR weight),
so runs with different loss weightings compare. Nothing here touches the training RNG or the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger

from loratk.sampling.pipeline import sampling_mode

logger = get_logger(__name__)


def fixed_timesteps(num_train_timesteps: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` timesteps, one drawn uniformly from each of `count` equal stretches of [0, T)."""
    edges = [round(i * num_train_timesteps / count) for i in range(count + 1)]
    return torch.cat(
        [
            torch.randint(lo, max(hi, lo + 1), (1,), generator=generator)
            for lo, hi in itertools.pairwise(edges)
        ]
    )


@dataclass
class ValidationItem:
    """One held-out image: a batch of one (latents and conditioning, or captions to encode), its noise and
    timesteps (one row each)."""

    path: str
    batch: dict[str, Any]
    noise: torch.Tensor  # [K, C, h, w]
    timesteps: torch.Tensor  # [K]


def _item_seed(seed: int, path: str) -> int:
    digest = hashlib.sha256(f"val-{seed}-{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def build_validation_items(
    denoiser: Any,
    dataset: Any,
    *,
    seed: int,
    timesteps_per_image: int,
    encode_text: bool,
) -> list[ValidationItem]:
    """Encode each image of `dataset` (an `ImageCaptionDataset` without augmentation) once: latents (the VAE
    mean, no draw), the family's conditioning, and (`encode_text`: frozen text encoders) the text conditioning.
    Seeds come from the image's path, so adding an image does not change the others' noise."""
    from loratk.data.dataset import collate_batch

    items = []
    keys = denoiser.model.family.conditioning_keys
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = collate_batch([dataset[index]])
            mean, _ = denoiser.encode_latent_dist(batch.pop("pixel_values"))
            batch["latents"] = mean.float().cpu()
            batch.pop("noise_seeds", None)
            if encode_text:
                conditioning = denoiser.encode_captions(batch["captions"])
                batch.update({key: conditioning[key].cpu() for key in keys})
            path = batch["paths"][0]
            generator = torch.Generator().manual_seed(_item_seed(seed, dataset.records[index].path.name))
            timesteps = fixed_timesteps(denoiser.num_train_timesteps, timesteps_per_image, generator)
            noise = torch.randn((timesteps_per_image, *mean.shape[1:]), generator=generator)
            items.append(ValidationItem(path=path, batch=batch, noise=noise, timesteps=timesteps))
    return items


def _repeat(value: Any, count: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.repeat(count, *[1] * (value.ndim - 1))
    return value


class ValidationLoss:
    """An epoch hook (on every process; sharded models need them all) returning `{"val/loss": ...}` every
    `every_n_epochs` epochs and after the last; `compute()` gives the number before training."""

    def __init__(
        self,
        denoiser: Any,
        items: Sequence[ValidationItem],
        *,
        modules: Sequence[torch.nn.Module],
        batch_size: int,
        every_n_epochs: int,
        num_epochs: int,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ):
        self.denoiser = denoiser
        self.items = list(items)
        self.modules = list(modules)
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.num_epochs = num_epochs
        self.autocast = autocast

    def compute(self) -> float:
        """The mean plain MSE over every image and its fixed timesteps (eval mode, no grad)."""
        total, count = 0.0, 0
        with sampling_mode(self.modules), self.autocast():
            for item in self.items:
                inputs = self.denoiser.encode_batch(item.batch)
                for start in range(0, len(item.timesteps), self.batch_size):
                    stop = min(start + self.batch_size, len(item.timesteps))
                    rows = stop - start
                    chunk = {
                        "latents": _repeat(inputs["latents"], rows),
                        "conditioning": {k: _repeat(v, rows) for k, v in inputs["conditioning"].items()},
                    }
                    device = chunk["latents"].device
                    losses = self.denoiser.per_sample_loss(
                        chunk,
                        noise=item.noise[start:stop].to(device),
                        timesteps=item.timesteps[start:stop].to(device),
                        weighted=False,
                    )
                    total += float(losses.double().sum())
                    count += rows
        return total / count

    def __call__(self, epoch: int, global_step: int) -> dict[str, float] | None:
        if epoch % self.every_n_epochs and epoch < self.num_epochs:
            return None
        loss = self.compute()
        logger.info(
            f"epoch {epoch}: val/loss {loss:.5f} ({len(self.items)} image(s))", main_process_only=True
        )
        return {"val/loss": loss}
