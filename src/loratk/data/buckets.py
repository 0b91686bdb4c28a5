"""Aspect-ratio buckets, resize-and-crop geometry and a seedable batch sampler (pure; no pixels here).

Every random choice takes an explicit `random.Random`, seeded by the caller from (seed, epoch, index), so
a given (seed, epoch) always replays the same batches, crops and flips: exact resume depends on it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


# ---------------------------------------------------------------- bucket generation and assignment


def default_bucket_sides(area: int, step: int) -> tuple[int, int]:
    """(min_side, max_side) when the recipe leaves them unset: half and twice the square side, on the step.

    For 1024x1024 at step 64 that is 512..2048, the range SDXL was trained on.
    """
    side = math.sqrt(area)
    low = max(step, int(side / 2) // step * step)
    high = max(low, int(side * 2) // step * step)
    return low, high


def compute_buckets(
    target: Size,
    *,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
) -> list[Size]:
    """Buckets (w, h) whose area is at most the target's, sides multiples of `step` in [min_side, max_side].

    For every width on the step the tallest height that fits is taken (and its transpose), plus the
    largest square and the target size itself. Sorted by aspect ratio (w / h), then width.
    """
    if step < 8 or step % 8:
        raise ValueError(f"bucket step must be a multiple of 8 and >= 8, got {step}")
    area = target[0] * target[1]
    default_low, default_high = default_bucket_sides(area, step)
    low = default_low if min_side is None else min_side
    high = default_high if max_side is None else max_side
    if low > high:
        raise ValueError(f"bucket min side {low} is larger than max side {high}")
    if low * low > area:
        raise ValueError(
            f"bucket min side {low} leaves no bucket: {low}x{low} exceeds the area {target[0]}x{target[1]}"
        )
    buckets: set[Size] = {tuple(target)}  # type: ignore[arg-type]
    square = int(math.sqrt(area)) // step * step
    if low <= square <= high:
        buckets.add((square, square))
    first = -(-low // step) * step  # the first multiple of step >= low
    for width in range(first, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(size: Size, buckets: Sequence[Size], *, no_upscale: bool = False, step: int = 64) -> Size:
    """The bucket closest to the image's aspect ratio (in log space); ties go to the larger bucket.

    With `no_upscale`, an image too small to cover that bucket gets its own bucket: its size rounded down
    to the step, so it is only ever cropped, never enlarged.
    """
    width, height = size
    log_aspect = math.log(width / height)

    def distance(bucket: Size) -> tuple[float, int]:
        return (round(abs(log_aspect - math.log(bucket[0] / bucket[1])), 12), -bucket[0] * bucket[1])

    best = min(buckets, key=distance)
    if no_upscale and (width < best[0] or height < best[1]):
        return (max(step, width // step * step), max(step, height // step * step))
    return best


def count_buckets(assigned: Iterable[Size]) -> list[tuple[Size, int]]:
    """Histogram of bucket assignments, sorted by aspect ratio."""
    counts = Counter(assigned)
    return sorted(counts.items(), key=lambda item: (item[0][0] / item[0][1], item[0][0]))


# ---------------------------------------------------------------- resize, crop, flip


@dataclass(frozen=True)
class CropPlan:
    resized: Size  # (width, height) after resizing, before cropping
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target: Size  # (width, height) of the crop = the bucket


def compute_crop_plan(
    original: Size,
    target: Size,
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


@dataclass(frozen=True)
class Transform:
    """Everything that turns an original image into a training image; also the latent-cache key."""

    bucket: Size  # (width, height) of the training image
    resized: Size  # (width, height) after resizing
    crop: tuple[int, int]  # (top, left) of the crop in the resized image, before any flip
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) as seen in the trained (possibly mirrored) image: what the SDXL time ids get."""
        top, left = self.crop
        if self.flip:
            left = self.resized[0] - left - self.bucket[0]
        return (top, left)

    def key(self) -> str:
        return (
            f"{self.bucket[0]}x{self.bucket[1]}-r{self.resized[0]}x{self.resized[1]}"
            f"-c{self.crop[0]},{self.crop[1]}-f{int(self.flip)}"
        )


def compute_transform(
    original: Size, bucket: Size, *, center_crop: bool, random_flip: bool, rng: random.Random
) -> Transform:
    """The resize, crop and flip of one image; draws from `rng` in a fixed order (crop, then flip)."""
    plan = compute_crop_plan(original, bucket, center=center_crop, rng=rng)
    flip = bool(random_flip and rng.random() < 0.5)
    return Transform(bucket=plan.target, resized=plan.resized, crop=plan.crop_top_left, flip=flip)


# ---------------------------------------------------------------- batches


class SeededBatchSampler:
    """Batches of indices, reshuffled per epoch from (seed, epoch) alone, so any epoch can be replayed.

    `groups` lists, per item, the group (bucket) it belongs to; a batch never mixes groups.
    """

    def __init__(
        self, groups: Sequence[int], batch_size: int, seed: int, drop_last: bool = False, shuffle: bool = True
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle  # False: file order, bucket by bucket (a fixed order for comparisons)
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
            if self.shuffle:
                rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        sizes = Counter(self.groups).values()
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes)
        return sum(math.ceil(n / self.batch_size) for n in sizes)
