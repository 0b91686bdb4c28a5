"""Training with the data pipeline: warm caches never call the VAE, bad images stop or are skipped up front."""

from __future__ import annotations

import csv
import logging

import pytest

from helpers import make_recipe
from loratk.run import TrainingRun


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def counters(monkeypatch):
    """Count VAE encodes (a wrapper around AutoencoderKL.encode) and text-encoder passes."""
    from diffusers import AutoencoderKL

    import loratk.models.sdxl as denoising  # the family's prompt encoding

    calls = {"vae": 0, "text": 0}
    vae_encode, encode_prompts = AutoencoderKL.encode, denoising.encode_prompts

    def counting_vae_encode(self, *args, **kwargs):
        calls["vae"] += 1
        return vae_encode(self, *args, **kwargs)

    def counting_encode_prompts(*args, **kwargs):
        calls["text"] += 1
        return encode_prompts(*args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_vae_encode)
    monkeypatch.setattr(denoising, "encode_prompts", counting_encode_prompts)
    return calls


def test_a_second_epoch_with_a_warm_cache_never_calls_the_vae(tmp_path, tiny_sdxl_dir, images_dir, counters):
    data = {"bucket_step": 16, "random_flip": True, "cache_dir": str(tmp_path / "cache")}
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, data=data, train={"epochs": 2})

    run = TrainingRun(recipe)
    run.setup()  # builds both caches: every (image, bucket, crop, flip) the two epochs draw
    assert counters["vae"] > 0 and counters["text"] > 0
    after_setup = dict(counters)
    result = run.train()
    run.cleanup()
    assert result.state.epoch == 3  # two epochs done: the state points at the next one
    assert counters == after_setup  # neither epoch called the VAE or the text encoders

    _reset_accelerate()
    counters.update(vae=0, text=0)
    again = TrainingRun(recipe)
    again.setup()  # a new run on the warm cache: nothing to encode
    again.train()
    again.cleanup()
    assert counters == {"vae": 0, "text": 0}


def test_without_caches_every_batch_is_encoded(tmp_path, tiny_sdxl_dir, images_dir, counters):
    data = {"bucket_step": 16, "cache_latents": False, "cache_text_embeddings": False}
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, data=data))
    run.setup()
    assert counters == {"vae": 0, "text": 0}
    run.train()
    run.cleanup()
    assert (
        counters["vae"] == counters["text"] == len(run.dataloader) == 4
    )  # buckets of 3, 2, 1 in batches of 2


def _add_bad_files(images_dir):
    (images_dir / "broken.png").write_text("not a picture")
    (images_dir / "broken.txt").write_text("a caption for a broken file")
    (images_dir / "pine.txt").unlink()


def test_bad_images_stop_training_before_any_model_loads(tmp_path, tiny_sdxl_dir, images_dir, monkeypatch):
    import loratk.models.sdxl as sdxl
    from loratk.data.dataset import DataError

    _add_bad_files(images_dir)
    monkeypatch.setattr(sdxl, "load_sdxl", lambda *a, **k: pytest.fail("the model must not load"))
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir))
    with pytest.raises(DataError) as info:
        run.setup()
    text = str(info.value)
    assert "broken.png: not an image" in text and "pine.txt: caption file is missing" in text
    assert 'on_bad_image = "skip"' in text and "loratk check" in text


def test_skip_trains_on_the_good_images_and_writes_skipped_csv(tmp_path, tiny_sdxl_dir, images_dir, caplog):
    _add_bad_files(images_dir)
    data = {"on_bad_image": "skip", "shuffle_tags": True, "cache_dir": str(tmp_path / "cache")}
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, data=data, train={"max_steps": 1})
    run = TrainingRun(recipe)
    with caplog.at_level(logging.INFO, logger="loratk"):
        run.setup()
        run.train()
    run.cleanup()
    assert len(run.dataset) == 5
    with open(run.run_dir / "skipped.csv", newline="") as fh:
        rows = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"broken.png", "pine.png"}
    assert rows["broken.png"]["kind"] == "not_an_image" and rows["pine.png"]["kind"] == "caption_missing"
    messages = caplog.text
    assert "skipped 2 image(s)" in messages
    assert "text-embedding cache off: data.shuffle_tags = true" in messages  # a logged reason, not a conflict
