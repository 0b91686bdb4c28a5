"""Aspect-ratio buckets (pure), transforms, and the seeded one-bucket batch sampler."""

from __future__ import annotations

import random

import pytest
import torch

from loratk.data.buckets import (
    SeededBatchSampler,
    Transform,
    assign_bucket,
    compute_buckets,
    compute_transform,
    count_buckets,
    default_bucket_sides,
)


def test_buckets_for_a_tiny_area():
    assert compute_buckets((64, 64), step=16) == [
        (32, 128),
        (32, 112),
        (32, 96),
        (48, 80),
        (64, 64),
        (80, 48),
        (96, 32),
        (112, 32),
        (128, 32),
    ]


def test_sdxl_buckets_cover_512_to_2048_within_the_area():
    buckets = compute_buckets((1024, 1024))
    assert default_bucket_sides(1024 * 1024, 64) == (512, 2048)
    assert {(1024, 1024), (1088, 960), (960, 1088), (2048, 512), (512, 2048), (1216, 832)} <= set(buckets)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(512 <= side <= 2048 for bucket in buckets for side in bucket)
    assert buckets == sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))
    assert set(buckets) == {(h, w) for w, h in buckets}  # every landscape bucket has its portrait twin


@pytest.mark.parametrize(
    "target, step, low, high, must_have",
    [
        ((600, 400), 64, None, None, (600, 400)),  # the training size itself is always a bucket
        ((1024, 1024), 8, 1000, 1048, (1024, 1024)),
        ((512, 512), 32, 256, 512, (512, 512)),
    ],
)
def test_bucket_options(target, step, low, high, must_have):
    buckets = compute_buckets(target, step=step, min_side=low, max_side=high)
    assert must_have in buckets
    area = target[0] * target[1]
    others = [b for b in buckets if b != tuple(target)]
    assert all(b[0] * b[1] <= area and b[0] % step == 0 and b[1] % step == 0 for b in others)
    if low is not None:
        assert all(low <= side <= high for b in others for side in b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step": 4}, "multiple of 8 and >= 8"),
        ({"step": 12}, "multiple of 8 and >= 8"),
        ({"min_side": 512, "max_side": 256}, "larger than max side"),
        ({"min_side": 2048, "max_side": 4096}, "leaves no bucket"),
    ],
)
def test_bad_bucket_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_buckets((1024, 1024), **kwargs)


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((176, 128), (80, 48)),  # 1.375: closer to 1.667 than to 1.0 in log space
        ((160, 160), (64, 64)),
        ((160, 128), (64, 64)),  # 1.25: closer to 1.0
        ((128, 192), (48, 80)),
        ((192, 144), (80, 48)),
        ((1000, 100), (128, 32)),  # extreme panoramas go to the most extreme bucket
    ],
)
def test_each_image_goes_to_the_nearest_aspect_ratio(size, bucket):
    assert assign_bucket(size, compute_buckets((64, 64), step=16)) == bucket


def test_ties_go_to_the_larger_bucket():
    assert assign_bucket((600, 400), compute_buckets((600, 400))) == (600, 400)  # not 576x384 (also 1.5)


def test_no_upscale_gives_small_images_their_own_bucket():
    buckets = compute_buckets((1024, 1024))
    assert assign_bucket((700, 500), buckets, no_upscale=True) == (640, 448)
    assert assign_bucket((700, 500), buckets) == (1216, 832)
    assert assign_bucket((3000, 2000), buckets, no_upscale=True) == assign_bucket((3000, 2000), buckets)
    transform = compute_transform(
        (700, 500), (640, 448), center_crop=True, random_flip=False, rng=random.Random(0)
    )
    assert transform.resized[0] <= 700 and transform.resized[1] <= 500  # only ever cropped


def test_bucket_histogram():
    assert count_buckets([(64, 64), (80, 48), (64, 64), (48, 80)]) == [
        ((48, 80), 1),
        ((64, 64), 2),
        ((80, 48), 1),
    ]


def test_flip_mirrors_the_crop_offset_seen_by_the_time_ids():
    plain = Transform(bucket=(64, 64), resized=(100, 64), crop=(0, 10), flip=False)
    flipped = Transform(bucket=(64, 64), resized=(100, 64), crop=(0, 10), flip=True)
    assert plain.crop_top_left == (0, 10) and flipped.crop_top_left == (0, 100 - 10 - 64)
    assert plain.key() != flipped.key()


def test_transforms_are_a_pure_function_of_the_rng_seed():
    def draw(seed):
        rng = random.Random(seed)
        return [
            compute_transform((300, 200), (64, 64), center_crop=False, random_flip=True, rng=rng)
            for _ in range(20)
        ]

    assert draw("7-3-1") == draw("7-3-1")
    transforms = draw("7-3-1")
    assert len({t.crop for t in transforms}) > 1 and {t.flip for t in transforms} == {True, False}
    assert all(0 <= t.crop[1] <= t.resized[0] - 64 for t in transforms)


@pytest.mark.parametrize("seed, epoch", [(0, 1), (0, 2), (5, 1), (123, 7)])
def test_sampler_batches_depend_only_on_seed_and_epoch(seed, epoch):
    groups = [i % 3 for i in range(17)]
    first = SeededBatchSampler(groups, 4, seed).batches(epoch)
    random.seed(999)  # the global RNG state must not matter, and must not be drawn from
    torch.manual_seed(999)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    again = SeededBatchSampler(groups, 4, seed).batches(epoch)
    assert first == again
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert sorted(i for b in first for i in b) == list(range(17))
    assert all(len({groups[i] for i in batch}) == 1 for batch in first)
    assert SeededBatchSampler(groups, 4, seed).batches(epoch + 1) != first


def test_sampler_length_counts_partial_batches_per_bucket():
    groups = [0, 0, 0, 1, 1, 2]
    assert len(SeededBatchSampler(groups, 2, 0)) == 4
    assert len(SeededBatchSampler(groups, 2, 0, drop_last=True)) == 2
