"""Latent and text-embedding caches: reuse, invalidation, NaN checks, interruption, dataset items from the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_recipe
from loratk.components.caches import text_cache_off_reason
from loratk.components.data import build_dataset
from loratk.data.cache import (
    CacheError,
    LatentCache,
    TextEmbeddingCache,
    build_latent_cache,
    build_text_cache,
    compute_module_fingerprint,
)
from loratk.data.dataset import collate_batch
from loratk.files import load_safetensors


class FakeVAE:
    """Counts calls; the "latent" is the pixel mean per 8x8 block, so results depend on the pixels."""

    def __init__(self, fail_after: int | None = None, nan_for_mean_above: float | None = None):
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after
        self.nan_for_mean_above = nan_for_mean_above

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += pixels.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixels, 8)[:, :1].repeat(1, 4, 1, 1)
        if self.nan_for_mean_above is not None:
            bad = pixels.mean(dim=(1, 2, 3)) > self.nan_for_mean_above
            mean[bad] = float("nan")
        return mean, torch.full_like(mean, 0.01)


def _dataset(tmp_path, images_dir, **data):
    recipe = make_recipe(tmp_path, "unused", images_dir, data={"bucket_step": 16, **data})
    return build_dataset(recipe)


def test_latents_are_reused_across_builds_and_invalidated_by_content_model_and_transform(
    tmp_path, images_dir
):
    root = tmp_path / "cache"
    cache = LatentCache(root, "a" * 64)
    vae = FakeVAE()
    stats = build_latent_cache(
        cache, _dataset(tmp_path, images_dir).latent_requests([1, 2]), vae, progress=False
    )
    assert (stats.total, stats.reused, stats.built, vae.images) == (6, 0, 6, 6)
    assert vae.calls == 3  # batched per bucket: 48x80 (1), 64x64 (2), 80x48 (3)

    stats = build_latent_cache(
        cache, _dataset(tmp_path, images_dir).latent_requests([1, 2, 3]), vae, progress=False
    )
    assert (stats.reused, stats.built, vae.images) == (6, 0, 6)  # same images, same model: all reused

    Image.open(images_dir / "pine.png").rotate(180).save(images_dir / "pine.png")  # same name, new content
    stats = build_latent_cache(
        cache, _dataset(tmp_path, images_dir).latent_requests([1]), vae, progress=False
    )
    assert (stats.reused, stats.built) == (5, 1)

    other_model = LatentCache(root, "b" * 64)
    stats = build_latent_cache(
        other_model, _dataset(tmp_path, images_dir).latent_requests([1]), vae, progress=False
    )
    assert stats.built == 6

    flipped = _dataset(tmp_path, images_dir, random_flip=True).latent_requests(range(1, 6))
    assert any(r.transform.flip for r in flipped)
    stats = build_latent_cache(cache, flipped, vae, progress=False)
    assert stats.built == sum(r.transform.flip for r in flipped) and stats.built > 0


def test_fingerprint_follows_weights_and_dtype():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    first = compute_module_fingerprint([module])
    assert compute_module_fingerprint([module]) == first
    with torch.no_grad():
        module.weight[0, 0] += 1e-3
    assert compute_module_fingerprint([module]) != first
    assert compute_module_fingerprint([module.to(torch.bfloat16)]) != compute_module_fingerprint(
        [module.float()]
    )


def test_a_nan_latent_names_the_image(tmp_path, images_dir):
    dataset = _dataset(tmp_path, images_dir)
    requests = dataset.latent_requests([1])
    from loratk.data.images import apply_transform, image_to_tensor, load_image

    # The fake VAE returns NaN for exactly one image: the one whose training pixels are brightest.
    means = {
        r.path.name: image_to_tensor(apply_transform(load_image(r.path), r.transform)).mean()
        for r in requests
    }
    ranked = sorted(means.values())
    threshold = float((ranked[-1] + ranked[-2]) / 2)
    with pytest.raises(CacheError) as info:
        build_latent_cache(
            LatentCache(tmp_path / "c", "f" * 64),
            requests,
            FakeVAE(nan_for_mean_above=threshold),
            batch_size=1,
            progress=False,
        )
    assert max(means, key=means.get) in str(info.value)
    assert "NaN" in str(info.value) and "fp16-fix" in str(info.value)


def test_an_interrupted_build_keeps_its_entries_and_continues(tmp_path, images_dir):
    dataset = _dataset(tmp_path, images_dir)
    cache = LatentCache(tmp_path / "c", "f" * 64)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(
            cache, dataset.latent_requests([1]), FakeVAE(fail_after=2), batch_size=1, progress=False
        )
    vae = FakeVAE()
    stats = build_latent_cache(cache, dataset.latent_requests([1]), vae, batch_size=1, progress=False)
    assert (stats.reused, stats.built, vae.images) == (2, 4, 4)
    assert not list(cache.folder.rglob("*.tmp"))  # atomic writes: no half files


def test_a_stop_request_ends_the_build_between_batches_and_keeps_entries(tmp_path, images_dir):
    from loratk.core.interrupts import TrainingInterrupted

    dataset = _dataset(tmp_path, images_dir)
    cache = LatentCache(tmp_path / "c", "f" * 64)
    vae = FakeVAE()
    asked = []
    with pytest.raises(TrainingInterrupted, match="while building the data caches"):
        build_latent_cache(
            cache,
            dataset.latent_requests([1]),
            vae,
            batch_size=1,
            progress=False,
            should_stop=lambda: asked.append(1) or len(asked) > 3,  # SIGTERM arrives during the 4th batch
        )
    assert vae.images == 3
    stats = build_latent_cache(cache, dataset.latent_requests([1]), FakeVAE(), batch_size=1, progress=False)
    assert (stats.reused, stats.built) == (3, 3)


def test_a_damaged_entry_is_rebuilt_and_reading_one_names_the_file(tmp_path, images_dir):
    dataset = _dataset(tmp_path, images_dir)
    cache = LatentCache(tmp_path / "c", "f" * 64)
    requests = dataset.latent_requests([1])
    build_latent_cache(cache, requests, FakeVAE(), progress=False)
    entry = cache.path_for(requests[0].sha256, requests[0].transform)
    entry.write_bytes(entry.read_bytes()[:20])
    with pytest.raises(CacheError) as info:
        cache.load(requests[0].sha256, requests[0].transform, requests[0].path)
    assert str(entry) in str(info.value) and "delete the file" in str(info.value)
    stats = build_latent_cache(cache, requests, FakeVAE(), progress=False)
    assert stats.built == 1


def test_dataset_items_come_from_the_caches_and_are_seeded(tmp_path, images_dir):
    dataset = _dataset(tmp_path, images_dir, caption_dropout=0.5)
    latents = LatentCache(tmp_path / "c", "f" * 64)
    text = TextEmbeddingCache(tmp_path / "c", "e" * 64)
    build_latent_cache(latents, dataset.latent_requests([1, 2]), FakeVAE(), progress=False)
    texts = dataset.caption_texts([1, 2])
    assert "" in texts  # caption dropout: the empty caption is cached too
    build_text_cache(
        text,
        texts,
        lambda batch: {
            "prompt_embeds": torch.randn(len(batch), 77, 8),
            "pooled_prompt_embeds": torch.randn(len(batch), 4),
        },
        progress=False,
    )
    dataset.use_caches(latents=latents, text=text)
    dataset.set_epoch(2)
    items = [dataset[i] for i in range(len(dataset))]
    assert all("pixel_values" not in item and item["latents"].shape[0] == 4 for item in items)
    again = dataset[0]
    assert torch.equal(again["latents"], items[0]["latents"])  # same (seed, epoch, index): same latent draw
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["latents"], items[0]["latents"])  # another epoch: another draw
    one_bucket = [i for i in range(len(dataset)) if dataset.bucket_of(i) == (80, 48)]
    batch = collate_batch([dataset[i] for i in one_bucket])
    assert batch["latents"].shape == (3, 4, 6, 10) and batch["prompt_embeds"].shape == (3, 77, 8)
    assert batch["pooled_prompt_embeds"].shape == (3, 4)


def test_tag_shuffle_variants_are_all_cached(tmp_path, images_dir):
    for txt in images_dir.glob("*.txt"):
        txt.write_text("woodblock, " + txt.read_text().strip())
    dataset = _dataset(tmp_path, images_dir, shuffle_tags=True, keep_tokens=1, tag_shuffle_variants=3)
    texts = dataset.caption_texts(range(1, 20))
    assert 6 < len(texts) <= 6 * 3 and all(t.startswith("woodblock, ") for t in texts)


@pytest.mark.parametrize(
    "data, lora, reason",
    [
        ({}, {}, None),
        ({"cache_text_embeddings": False}, {}, "cache_text_embeddings = false"),
        ({}, {"train_text_encoders": True}, "train_text_encoders = true"),
        ({"shuffle_tags": True}, {}, "set data.tag_shuffle_variants = N"),
        ({"shuffle_tags": True, "tag_shuffle_variants": 4}, {}, None),
    ],
)
def test_text_cache_is_off_only_with_a_stated_reason(tmp_path, data, lora, reason):
    recipe = make_recipe(tmp_path, "m", tmp_path, data=data, lora=lora)
    got = text_cache_off_reason(recipe)
    assert got is None if reason is None else reason in got


def test_cache_copies_are_independent_of_folder_names(tmp_path, images_dir):
    """The key is the content hash: a moved or renamed folder reuses the cache."""
    cache = LatentCache(tmp_path / "c", "f" * 64)
    build_latent_cache(cache, _dataset(tmp_path, images_dir).latent_requests([1]), FakeVAE(), progress=False)
    moved = Path(shutil.copytree(images_dir, tmp_path / "renamed"))
    stats = build_latent_cache(
        cache, _dataset(tmp_path, moved).latent_requests([1]), FakeVAE(), progress=False
    )
    assert stats.built == 0


def test_two_processes_split_the_caching_without_duplicate_work(tmp_path, images_dir):
    """Each rank encodes its own shard of the missing entries; together they cover all, none twice."""
    dataset = _dataset(tmp_path, images_dir)
    cache = LatentCache(tmp_path / "cache", "a" * 64)
    vaes = [FakeVAE(), FakeVAE()]
    for rank, vae in enumerate(vaes):
        build_latent_cache(
            cache, dataset.latent_requests([1]), vae, process_index=rank, num_processes=2, progress=False
        )
    assert [v.images for v in vaes] == [3, 3]
    stats = build_latent_cache(cache, dataset.latent_requests([1]), FakeVAE(), progress=False)
    assert (stats.reused, stats.built) == (6, 0)

    texts = TextEmbeddingCache(tmp_path / "cache", "t" * 64)
    encoded: list[list[str]] = [[], []]
    captions = dataset.caption_texts([1])

    def encoder(rank):
        def encode(batch):
            encoded[rank].extend(batch)
            return {
                "prompt_embeds": torch.zeros(len(batch), 4, 8),
                "pooled_prompt_embeds": torch.zeros(len(batch), 8),
            }

        return encode

    for rank in (0, 1):
        build_text_cache(texts, captions, encoder(rank), process_index=rank, num_processes=2, progress=False)
    assert not set(encoded[0]) & set(encoded[1])
    assert sorted(encoded[0] + encoded[1]) == sorted(set(captions))


def test_an_entry_with_nan_values_or_the_wrong_shape_is_rebuilt_and_said_so(tmp_path, images_dir):
    from safetensors.torch import save_file

    dataset = _dataset(tmp_path, images_dir)
    requests = dataset.latent_requests([1])
    cache = LatentCache(tmp_path / "c", "f" * 64, channels=4, downscale=8)
    build_latent_cache(cache, requests, FakeVAE(), progress=False)
    nan_entry = cache.path_for(requests[0].sha256, requests[0].transform)
    mean = load_safetensors(nan_entry)[0]["mean"]
    save_file({"mean": torch.full_like(mean, float("nan")), "std": torch.ones_like(mean)}, str(nan_entry))
    shape_entry = cache.path_for(requests[1].sha256, requests[1].transform)
    save_file({"mean": torch.zeros(4, 3, 3), "std": torch.zeros(4, 3, 3)}, str(shape_entry))
    with pytest.raises(CacheError, match="damaged cache entry"):  # reading one is never silent
        cache.load(requests[0].sha256, requests[0].transform, requests[0].path)
    vae = FakeVAE()
    stats = build_latent_cache(cache, requests, vae, progress=False)
    assert (stats.built, vae.images) == (2, 2)
    assert (
        len(stats.rebuilt) == 2
        and "NaN/inf" in " ".join(stats.rebuilt)
        and "shape" in " ".join(stats.rebuilt)
    )
    assert "2 damaged entries rebuilt" in stats.describe() and str(nan_entry) in stats.describe()
    mean, _ = cache.load(requests[0].sha256, requests[0].transform, requests[0].path)
    assert torch.isfinite(mean).all()


def test_a_run_on_a_poisoned_latent_cache_equals_a_clean_run(tmp_path, tiny_sdxl_dir, images_dir, caplog):
    """The trial run's fault: a NaN entry was reused, updates were skipped, and the run exited 0."""
    import logging

    from safetensors.torch import save_file

    from loratk.run import TrainingRun

    def run(name, cache_dir):
        recipe = make_recipe(
            tmp_path,
            tiny_sdxl_dir,
            images_dir,
            name=name,
            data={"cache_dir": str(cache_dir)},
            export={"dtype": "fp32"},
        )
        training = TrainingRun(recipe)
        training.setup()
        try:
            result = training.train()
        finally:
            training.cleanup()
        return result, load_safetensors(training.run_dir / f"{name}.safetensors")[0]

    _, clean = run("clean", tmp_path / "cache")
    entries = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    good = load_safetensors(entries[0])[0]
    mean = good["mean"]
    save_file({"mean": torch.full_like(mean, float("nan")), "std": torch.ones_like(mean)}, str(entries[0]))
    caplog.set_level(logging.WARNING, logger="loratk")
    result, poisoned = run("again", tmp_path / "cache")
    assert result.state.nonfinite_steps == 0
    assert "1 damaged entry rebuilt" in caplog.text and str(entries[0]) in caplog.text
    # The entry is encoded again, alone (the VAE rounds a batch of 1 and one of 4 apart in the last bits).
    torch.testing.assert_close(load_safetensors(entries[0])[0], good, rtol=1e-4, atol=1e-5)
    for key in clean:
        torch.testing.assert_close(poisoned[key], clean[key], rtol=1e-3, atol=1e-5)
