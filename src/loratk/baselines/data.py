"""The GAN's images: the preflight's good images, resized to cover the square and centre-cropped, pixels in
[-1, 1]; batches in an order that depends only on (seed, epoch), as for the adapters' data."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loratk.data.buckets import SeededBatchSampler, compute_transform
from loratk.data.dataset import DataError
from loratk.data.images import MAX_PIXELS, ImageLoadError, apply_transform, image_to_tensor, load_image


class SquareImageDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], resolution: int, max_pixels: int = MAX_PIXELS):
        self.paths = [Path(p) for p in paths]
        self.resolution = resolution
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def load_square(self, index: int) -> Any:
        """Image `index` as a PIL RGB square (what the discriminator and the metrics see as real)."""
        path = self.paths[index]
        try:
            image = load_image(path, self.max_pixels)
        except ImageLoadError as err:
            raise DataError([str(err)]) from None
        side = (self.resolution, self.resolution)
        transform = compute_transform(
            image.size, side, center_crop=True, random_flip=False, rng=random.Random(0)
        )
        return apply_transform(image, transform)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": image_to_tensor(self.load_square(index)), "path": str(self.paths[index])}


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),  # [B, 3, R, R]
        "paths": [item["path"] for item in items],
    }


def build_image_dataloader(
    dataset: SquareImageDataset, *, batch_size: int, seed: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    sampler = SeededBatchSampler([0] * len(dataset), batch_size, seed)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_images, num_workers=num_workers
    )
