"""The validation loss: held-out images by seed, fixed noise and timesteps, and the same numbers wherever the
same weights are evaluated (every epoch, another run, after a resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_recipe, step_rows
from loratk.data.dataset import DataError
from loratk.data.holdout import holdout_paths, split_holdout
from loratk.evaluation.validation import fixed_timesteps


def test_holdout_is_drawn_by_seed_whatever_the_listing_order():
    paths = [Path(f"img{i}.png") for i in range(10)]
    held = holdout_paths(paths, 3, seed=5)
    assert len(held) == 3 and held == holdout_paths(list(reversed(paths)), 3, seed=5)
    assert held != holdout_paths(paths, 3, seed=6) or held != holdout_paths(paths, 3, seed=7)
    items = [p.name for p in paths] + ["img0.png"]  # an image listed twice (repeats) is held out whole
    train, out = split_holdout(items, [Path(i) for i in items], 3, seed=5)
    assert sorted(out) == sorted(p.name for p in held) + (["img0.png"] if Path("img0.png") in held else [])
    assert not set(train) & set(out) and len(train) + len(out) == 11


def test_holding_out_every_image_is_a_clear_error():
    with pytest.raises(DataError, match=r"eval.holdout = 3 would hold out every one of the 3 image"):
        holdout_paths([Path("a.png"), Path("b.png"), Path("c.png")], 3, seed=0)


def test_fixed_timesteps_cover_the_schedule_one_per_stretch():
    steps = fixed_timesteps(1000, 4, torch.Generator().manual_seed(0))
    assert [int(t) // 250 for t in steps] == [0, 1, 2, 3]
    again = fixed_timesteps(1000, 4, torch.Generator().manual_seed(0))
    assert torch.equal(steps, again)


def _val_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/loss" in r]


def test_validation_loss_is_logged_before_training_and_every_epoch(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.run import train

    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, train={"epochs": 2}, eval={"holdout": 1})
    run_dir = train(recipe)
    val = _val_rows(run_dir)
    assert [(r["epoch"], r["step"]) for r in val] == [(0, 0), (1, 3), (2, 6)]  # 5 images, batch 2: 3 steps
    assert all(r["val/loss"] > 0 for r in val) and val[0]["val/loss"] != val[-1]["val/loss"]
    # The held-out image never trained: 5 of the 6 images, in 3 batches an epoch.
    assert len(step_rows(run_dir / "metrics.jsonl")) == 6
    with open(run_dir / "recipe.resolved.toml") as fh:
        assert "holdout = 1" in fh.read()
    usage = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    usage = [r for r in usage if "time/epoch_s" in r]
    assert [r["epoch"] for r in usage] == [1, 2]
    assert all(r["time/epoch_s"] > 0 and r["mem/peak_rss_gib"] > 0 for r in usage)


def test_validation_loss_is_the_same_for_the_same_weights_in_another_run(tmp_path, tiny_sdxl_dir, images_dir):
    """Two runs (different learning rates, different names) start from the same base: their epoch-0 numbers
    are identical; the same recipe twice gives identical curves."""
    from loratk.run import train

    a = train(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="a", eval={"holdout": 2}))
    b = train(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="b", eval={"holdout": 2}))
    c = train(
        make_recipe(
            tmp_path,
            tiny_sdxl_dir,
            images_dir,
            name="c",
            eval={"holdout": 2},
            train={"epochs": 1, "batch_size": 2, "learning_rate": 1e-2, "mixed_precision": "no"},
        )
    )
    va, vb, vc = _val_rows(a), _val_rows(b), _val_rows(c)
    assert [r["val/loss"] for r in va] == [r["val/loss"] for r in vb]
    assert va[0]["val/loss"] == vc[0]["val/loss"] and va[1]["val/loss"] != vc[1]["val/loss"]


def test_a_validation_folder_is_used_beside_the_held_out_images(tmp_path, tiny_sdxl_dir, images_dir):
    import shutil

    from loratk.run import TrainingRun

    folder = tmp_path / "val"
    folder.mkdir()
    for src in sorted(images_dir.glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
        shutil.copy(src.with_suffix(".txt"), folder / src.with_suffix(".txt").name)
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, eval={"holdout": 1, "folder": str(folder)})
    run = TrainingRun(recipe)
    try:
        run.setup()
        assert len(run.validation.items) == 3
        assert len({r.path for r in run.dataset.records}) == 5
    finally:
        run.cleanup()


def test_a_validation_folder_without_captions_names_the_image(tmp_path, tiny_sdxl_dir, images_dir):
    import shutil

    from loratk.run import train

    folder = tmp_path / "val"
    folder.mkdir()
    image = sorted(images_dir.glob("*.png"))[0]
    shutil.copy(image, folder / image.name)
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, eval={"folder": str(folder)})
    with pytest.raises(
        DataError,
        match=rf"(?s)in the validation images \(eval.folder\).*{image.stem}.txt: caption file is missing",
    ):
        train(recipe)
