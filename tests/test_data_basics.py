from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from loratk.data.buckets import SeededBatchSampler, compute_crop_plan
from loratk.data.captions import read_sidecar_caption
from loratk.data.dataset import DataError, ImageCaptionDataset, collate_batch, scan_image_folder
from loratk.data.tags import apply_trigger_word
from loratk.models.sdxl import compute_time_ids


def test_missing_and_empty_captions_are_all_reported_with_their_files(images_dir):
    (images_dir / "boat.txt").unlink()
    (images_dir / "pine.txt").write_text("   \n")
    with pytest.raises(DataError) as info:
        scan_image_folder(images_dir)
    text = str(info.value)
    assert "boat.txt: caption file is missing" in text and "loratk caption" in text
    assert "pine.txt: caption is empty" in text
    assert len(info.value.problems) == 2


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path)


def test_caption_is_normalised_and_trigger_word_goes_first_once(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeff a  red\nsun \n", encoding="utf-8")
    assert read_sidecar_caption(tmp_path / "a.png") == "a red sun"
    assert apply_trigger_word("a red sun", "ukiyoe") == "ukiyoe, a red sun"
    assert apply_trigger_word("ukiyoe, a red sun", "ukiyoe") == "ukiyoe, a red sun"


@pytest.mark.parametrize(
    "original, target, resized, crop",
    [
        ((200, 100), (64, 64), (128, 64), (0, 32)),
        ((100, 200), (64, 64), (64, 128), (32, 0)),
        ((600, 400), (600, 400), (600, 400), (0, 0)),
    ],
)
def test_crop_plan_covers_the_target_and_centres(original, target, resized, crop):
    plan = compute_crop_plan(original, target, center=True)
    assert plan.resized == resized and plan.crop_top_left == crop and plan.target == target


def test_random_crop_stays_inside():
    rng = random.Random(0)
    for _ in range(50):
        plan = compute_crop_plan((300, 100), (64, 64), center=False, rng=rng)
        top, left = plan.crop_top_left
        assert 0 <= left <= plan.resized[0] - 64 and top == 0


def test_batch_sampler_is_a_function_of_seed_and_epoch():
    sampler = SeededBatchSampler([0] * 10, batch_size=3, seed=1)
    assert sampler.batches(1) == SeededBatchSampler([0] * 10, 3, seed=1).batches(1)
    assert sampler.batches(1) != sampler.batches(2)
    assert sorted(i for b in sampler.batches(1) for i in b) == list(range(10))
    assert len(sampler) == 4
    assert len(SeededBatchSampler([0] * 10, 3, seed=1, drop_last=True)) == 3


def test_batches_never_mix_groups():
    groups = [0, 1, 0, 1, 1, 0, 2]
    for batch in SeededBatchSampler(groups, batch_size=2, seed=0).batches(3):
        assert len({groups[i] for i in batch}) == 1


def test_dataset_items_carry_sdxl_size_conditioning(images_dir):
    dataset = ImageCaptionDataset(scan_image_folder(images_dir), (64, 64))
    item = dataset[0]  # boat.png is 176x128
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert item["original_size"] == (128, 176) and item["target_size"] == (64, 64)
    assert item["crop_top_left"] == (0, (88 - 64) // 2)
    batch = collate_batch([dataset[0], dataset[1]])
    time_ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
    assert time_ids.shape == (2, 6)
    assert time_ids[0].tolist() == [128.0, 176.0, 0.0, 12.0, 64.0, 64.0]


def test_caption_dropout_and_flip_are_seeded(images_dir):
    a = ImageCaptionDataset(
        scan_image_folder(images_dir), (64, 64), random_flip=True, caption_dropout=0.5, seed=3
    )
    b = ImageCaptionDataset(
        scan_image_folder(images_dir), (64, 64), random_flip=True, caption_dropout=0.5, seed=3
    )
    items_a, items_b = [a[i] for i in range(6)], [b[i] for i in range(6)]
    assert [x["caption"] for x in items_a] == [x["caption"] for x in items_b]
    assert "" in [x["caption"] for x in items_a]
    assert all(
        torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(items_a, items_b, strict=True)
    )


def test_exif_rotated_image_is_upright(tmp_path):
    from loratk.data.images import load_image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
