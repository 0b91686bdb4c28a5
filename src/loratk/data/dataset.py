"""Records (image + caption) -> tensors -> batches. The loop sees only the DataLoader this builds."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loratk.data.buckets import SeededBatchSampler, compute_crop_plan
from loratk.data.captions import CaptionError, read_sidecar_caption
from loratk.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image


class DataError(ValueError):
    """Problems found in the training data, all of them, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the training data:\n{lines}")


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError([f"{folder}: image folder not found; set data.dir to a folder of images"])
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(folder: str | Path, caption_ext: str = ".txt") -> list[Record]:
    """Every image in `folder` with its sidecar caption; all missing/unreadable captions reported together."""
    images = list_images(folder)
    if not images:
        raise DataError([f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}); put training images there"])
    records, problems = [], []
    for path in images:
        try:
            records.append(Record(path, read_sidecar_caption(path, caption_ext)))
        except CaptionError as err:
            problems.append(str(err))
    if problems:
        raise DataError(problems)
    return records


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized to cover the training size and cropped; randomness is drawn from (seed, epoch, index)."""

    def __init__(
        self,
        records: Sequence[Record],
        size: tuple[int, int],
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.records = list(records)
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        try:
            image = load_image(record.path)
        except ImageLoadError as err:
            raise DataError([str(err)]) from None
        original = (image.height, image.width)
        plan = compute_crop_plan(image.size, self.size, center=self.center_crop, rng=rng)
        image = image.resize(plan.resized, Image.Resampling.LANCZOS)
        top, left = plan.crop_top_left
        image = image.crop((left, top, left + plan.target[0], top + plan.target[1]))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption = "" if rng.random() < self.caption_dropout else record.caption
        return {
            "pixel_values": _to_tensor(image),
            "caption": caption,
            "original_size": original,
            "crop_top_left": (top, left),
            "target_size": (plan.target[1], plan.target[0]),
            "path": str(record.path),
        }


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; sizes become [B, 2] tensors (height, width) / (top, left) for the SDXL time ids."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "original_sizes": torch.tensor([item["original_size"] for item in items]),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items]),
        "target_sizes": torch.tensor([item["target_size"] for item in items]),
        "paths": [item["path"] for item in items],
    }


def build_dataloader(
    dataset: ImageCaptionDataset, *, batch_size: int, seed: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader whose batch order depends only on (seed, epoch): see `SeededBatchSampler`."""
    sampler = SeededBatchSampler([0] * len(dataset), batch_size, seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_batch,
        num_workers=num_workers,
        persistent_workers=False,
    )
