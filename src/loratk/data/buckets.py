"""Resize-and-crop geometry and a seedable batch sampler (pure; no images are touched here)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CropPlan:
    resized: tuple[int, int]  # (width, height) after resizing, before cropping
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target: tuple[int, int]  # (width, height) of the crop = the training size


def compute_crop_plan(
    original: tuple[int, int],
    target: tuple[int, int],
    *,
    center: bool = True,
    rng: random.Random | None = None,
) -> CropPlan:
    """Scale `original` (w, h) so it covers `target` (w, h), then crop (centre or random) to `target`."""
    (ow, oh), (tw, th) = original, target
    scale = max(tw / ow, th / oh)
    rw, rh = max(tw, math.ceil(ow * scale - 1e-6)), max(th, math.ceil(oh * scale - 1e-6))
    if center or rng is None:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    return CropPlan(resized=(rw, rh), crop_top_left=(top, left), target=(tw, th))


class SeededBatchSampler:
    """Batches of indices, reshuffled per epoch from (seed, epoch) alone, so any epoch can be replayed.

    `groups` lists, per item, the group (bucket) it belongs to; a batch never mixes groups.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        by_group: dict[int, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        out: list[list[int]] = []
        for group in sorted(by_group):
            members = by_group[group]
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        sizes = Counter(self.groups).values()
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes)
        return sum(math.ceil(n / self.batch_size) for n in sizes)
