"""The held-out images of a run: drawn once from the seed, out of training, into the validation loss."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from loratk.data.dataset import DataError

T = TypeVar("T")


def holdout_paths(paths: Sequence[Path], count: int, seed: int) -> set[Path]:
    """`count` of the distinct `paths`, drawn by `seed` from their sorted order: the same images for the same
    folder and seed, whatever order the folder was listed in."""
    distinct = sorted(set(paths))
    if count <= 0:
        return set()
    if count >= len(distinct):
        raise DataError(
            [
                f"eval.holdout = {count} would hold out every one of the {len(distinct)} image(s), leaving "
                "none to train on"
            ],
            hint=f"set eval.holdout below {len(distinct)}, or give validation images in eval.folder instead",
        )
    return set(random.Random(f"holdout-{seed}").sample(distinct, count))


def split_holdout(
    items: Sequence[T], paths: Sequence[Path], count: int, seed: int
) -> tuple[list[T], list[T]]:
    """(training items, held-out items); `paths[i]` is the image of `items[i]`. Every item of a held-out
    image is held out (an image listed twice is not trained on through its second copy)."""
    held = holdout_paths(paths, count, seed)
    train = [item for item, path in zip(items, paths, strict=True) if path not in held]
    out = [item for item, path in zip(items, paths, strict=True) if path in held]
    return train, out
