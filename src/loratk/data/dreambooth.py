"""DreamBooth data: each example pairs an instance image (the subject) with a class image (the prior).

Built from the pieces of `data/dataset.py` (records, image transforms, the seeded batch sampler); only the
pairing and the collation are new here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loratk.data.buckets import SeededBatchSampler
from loratk.data.dataset import DataError, ImageCaptionDataset, Record, collate_batch, scan_image_folder


def scan_instance_folder(folder: str | Path, instance_prompt: str, caption_ext: str = ".txt") -> list[Record]:
    """Every image in `folder`: its sidecar caption where there is one, else `instance_prompt`."""
    return scan_image_folder(
        folder,
        caption_ext,
        fallback_caption=instance_prompt,
        empty_hint="no instance images; set dreambooth.instance_dir to the subject's images",
    )


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item i = instance i, plus (with prior preservation) a class image that rotates with the epoch, so
    every class image is used over the run. An epoch is one pass over the instance images."""

    def __init__(
        self,
        instance_records: Sequence[Record],
        size: tuple[int, int],
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.instances = ImageCaptionDataset(
            instance_records,
            size,
            center_crop=center_crop,
            random_flip=random_flip,
            caption_dropout=caption_dropout,
            seed=seed,
        )
        self.held_out: list[Record] = []  # instance images kept out of training for the validation loss
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.classes: ImageCaptionDataset | None = None
        self.epoch = 0

    @property
    def records(self) -> list[Record]:
        return self.instances.records

    def set_class_records(self, records: Sequence[Record]) -> None:
        """Attach the class images (known only after they were generated with the model)."""
        if not records:
            raise DataError(["no class images to pair with the instance images"])
        self.classes = ImageCaptionDataset(
            records, self.size, center_crop=self.center_crop, random_flip=self.random_flip, seed=self.seed + 1
        )
        self.classes.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.instances.set_epoch(epoch)
        if self.classes is not None:
            self.classes.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"instance": self.instances[index]}
        if self.classes is not None:
            example = self.classes[(self.epoch * len(self) + index) % len(self.classes)]
            # With fewer class images than instance items, one class image serves several items of an epoch
            # (even of one batch): each occurrence draws its own noise and timestep.
            example["noise_seed"] = self.instances.noise_seed(index, self.epoch, "-class")
            item["class"] = example
        return item


def collate_dreambooth(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Instance examples first, then their class examples: one batch of 2B (or B without a prior)."""
    examples = [item["instance"] for item in items]
    examples += [item["class"] for item in items if "class" in item]
    batch = collate_batch(examples)
    batch["num_instance"] = len(items)
    return batch


def build_dreambooth_dataloader(
    dataset: DreamBoothDataset, *, batch_size: int, seed: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Batch order depends only on (seed, epoch), as for the caption data."""
    sampler = SeededBatchSampler([0] * len(dataset), batch_size, seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_dreambooth,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU without blocking
    )
