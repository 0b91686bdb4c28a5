"""Records (image + caption + size + bucket) -> items -> batches. The loop sees only the DataLoader built here.

Every random choice of an item (crop, flip, caption dropout, tag shuffle, the latent draw from a cached
distribution) comes from `random.Random(f"{seed}-{epoch}-{index}")`, never from global RNG, so a given
(seed, epoch) replays exactly, cached or not.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratk.data.buckets import SeededBatchSampler, Size, Transform, compute_transform
from loratk.data.captions import CaptionError, read_sidecar_caption, sidecar_path
from loratk.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageLoadError,
    apply_transform,
    image_to_tensor,
    list_image_files,
    load_image,
)
from loratk.data.tags import shuffle_tags, tag_shuffle_variant


class DataError(ValueError):
    """Problems found in the training data, all of them, one line each."""

    def __init__(self, problems: list[str], hint: str = "", what: str = "the training data"):
        self.problems = problems
        self.hint = hint
        self.what = what
        lines = "\n".join(f"  {p}" for p in problems)
        tail = f"\n  hint: {hint}" if hint else ""
        super().__init__(f"{len(problems)} problem(s) in {what}:\n{lines}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so the main process can hand it to the others
        return (DataError, (self.problems, self.hint, self.what))


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str  # trigger word already applied
    size: Size | None = None  # (width, height) of the upright original; None = read it when needed
    bucket: Size | None = None  # (width, height) of the training image; None = the dataset's size
    sha256: str = ""  # content hash (the latent-cache key)
    subset: str = ""  # the image folder it came from
    trigger: str | None = None  # stays in front when tags are shuffled


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError([f"{folder}: image folder not found; set data.dir to a folder of images"])
    return list_image_files(folder)


def scan_image_folder(
    folder: str | Path,
    caption_ext: str = ".txt",
    *,
    fallback_caption: str | None = None,
    empty_hint: str = "",
) -> list[Record]:
    """Every image in `folder` with its sidecar caption; all missing/unreadable captions reported together.

    With `fallback_caption`, an image without a sidecar file gets that caption (DreamBooth's instance prompt)
    instead of an error. A quick scan without decoding; training uses the full preflight (`loratk.data.check`).
    """
    images = list_images(folder)
    if not images:
        hint = empty_hint or f"no images ({', '.join(IMAGE_EXTENSIONS)}); put training images there"
        raise DataError([f"{folder}: {hint}"])
    records, problems = [], []
    for path in images:
        if fallback_caption is not None and not sidecar_path(path, caption_ext).is_file():
            records.append(Record(path, fallback_caption))
            continue
        try:
            records.append(Record(path, read_sidecar_caption(path, caption_ext)))
        except CaptionError as err:
            problems.append(str(err))
    if problems:
        raise DataError(problems)
    return records


@dataclass(frozen=True)
class ItemPlan:
    """What item `index` is in a given epoch, decided without touching any pixel."""

    transform: Transform
    caption: str
    original_size: Size  # (width, height)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized to cover their bucket and cropped, or their cached latents; captions or cached embeddings."""

    def __init__(
        self,
        records: Sequence[Record],
        size: Size,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        tag_shuffle_variants: int = 0,
        max_pixels: int = MAX_PIXELS,
    ):
        self.records = list(records)
        self.held_out: list[Record] = []  # images kept out of training for the validation loss
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_shuffle_variants = tag_shuffle_variants
        self.max_pixels = max_pixels
        self.epoch = 0
        self.latent_cache: Any = None
        self.text_cache: Any = None
        self._sizes: dict[Path, Size] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def use_caches(self, *, latents: Any = None, text: Any = None) -> None:
        """From now on read latents / text embeddings from these caches (built for every epoch to run)."""
        self.latent_cache = latents
        self.text_cache = text

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, index: int) -> Size:
        return self.records[index].bucket or self.size

    def groups(self) -> list[int]:
        """Per item, the index of its bucket in sorted order: the sampler never mixes them in a batch."""
        buckets = sorted({self.bucket_of(i) for i in range(len(self))})
        ids = {bucket: i for i, bucket in enumerate(buckets)}
        return [ids[self.bucket_of(i)] for i in range(len(self))]

    def _original_size(self, record: Record) -> Size:
        if record.size is not None:
            return record.size
        if record.path not in self._sizes:
            self._sizes[record.path] = self._load(record).size
        return self._sizes[record.path]

    def _load(self, record: Record):
        try:
            return load_image(record.path, self.max_pixels)
        except ImageLoadError as err:
            raise DataError([str(err)]) from None

    def _rng(self, index: int, epoch: int, stream: str = "") -> random.Random:
        return random.Random(f"{self.seed}-{epoch}-{index}{stream}")

    def noise_seed(self, index: int, epoch: int, stream: str = "") -> int:
        """The seed of item `index`'s noise and timestep in `epoch`: a function of (seed, epoch, index) alone,
        so the same sample gets the same noise whatever the batch size or the number of processes."""
        return self._rng(index, epoch, f"{stream}-noise").getrandbits(63)

    def plan_item(self, index: int, epoch: int) -> ItemPlan:
        """The transform and caption of item `index` in `epoch`: a pure function of (seed, epoch, index)."""
        record = self.records[index]
        rng = self._rng(index, epoch)
        original = self._original_size(record)
        transform = compute_transform(
            original,
            self.bucket_of(index),
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=rng,
        )
        caption = "" if rng.random() < self.caption_dropout else record.caption
        if caption and self.shuffle_tags:
            if self.tag_shuffle_variants:
                variant = rng.randrange(self.tag_shuffle_variants)
                caption = tag_shuffle_variant(caption, self.keep_tokens, variant, record.trigger)
            else:
                caption = shuffle_tags(caption, self.keep_tokens, rng, record.trigger)
        return ItemPlan(transform, caption, original)

    def latent_requests(self, epochs: Iterable[int]) -> list[Any]:
        """Every (image, transform) the given epochs will draw: what the latent cache must hold."""
        from loratk.data.cache import LatentRequest

        requests = {}
        for epoch in epochs:
            for index, record in enumerate(self.records):
                transform = self.plan_item(index, epoch).transform
                requests.setdefault((record.sha256, record.path, transform), None)
        return [LatentRequest(path, sha, transform) for sha, path, transform in requests]

    def caption_texts(self, epochs: Iterable[int]) -> set[str]:
        """Every caption text the given epochs will use (the empty one with caption dropout)."""
        texts = set()
        for epoch in epochs:
            texts.update(self.plan_item(index, epoch).caption for index in range(len(self)))
        return texts

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        plan = self.plan_item(index, self.epoch)
        transform = plan.transform
        item: dict[str, Any] = {
            "caption": plan.caption,
            "original_size": (plan.original_size[1], plan.original_size[0]),  # (h, w) for the time ids
            "crop_top_left": transform.crop_top_left,
            "target_size": (transform.bucket[1], transform.bucket[0]),
            "path": str(record.path),
            "noise_seed": self.noise_seed(index, self.epoch),
        }
        if self.latent_cache is not None:
            from loratk.data.cache import sample_latents

            mean, std = self.latent_cache.load(record.sha256, transform, record.path)
            generator = torch.Generator().manual_seed(self._rng(index, self.epoch, "-latent").getrandbits(63))
            item["latents"] = sample_latents(mean, std, generator)
        else:
            item["pixel_values"] = image_to_tensor(apply_transform(self._load(record), transform))
        if self.text_cache is not None:
            item.update(self.text_cache.load(plan.caption))  # the family's conditioning tensors, by name
        return item


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; sizes become [B, 2] tensors (height, width) / (top, left) for the SDXL time ids."""
    batch: dict[str, Any] = {
        "captions": [item["caption"] for item in items],
        "original_sizes": torch.tensor([item["original_size"] for item in items]),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items]),
        "target_sizes": torch.tensor([item["target_size"] for item in items]),
        "paths": [item["path"] for item in items],
        "noise_seeds": [item["noise_seed"] for item in items],
    }
    for key, value in items[0].items():  # pixels or latents, and cached text conditioning
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def build_dataloader(
    dataset: ImageCaptionDataset, *, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True
) -> torch.utils.data.DataLoader:
    """A DataLoader whose batches come from one bucket each and depend only on (seed, epoch)."""
    sampler = SeededBatchSampler(dataset.groups(), batch_size, seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_batch,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU without blocking
    )
