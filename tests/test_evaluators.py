"""The feature models (tiny builtins, loaded through `from_pretrained` offline) and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loratk.evaluation.evaluators import EvaluatorError, load_evaluator
from loratk.evaluation.features import FeatureCache
from loratk.evaluation.inception import inception_input
from loratk.evaluation.tiny import (
    build_tiny_clip,
    build_tiny_dino,
    build_tiny_dinov2,
    build_tiny_inception,
    materialise_tiny_evaluator,
    save_tiny_dino,
)

BUILTINS = {
    "clip": "builtin:tiny-clip",
    "dino": "builtin:tiny-dino",
    "dinov2": "builtin:tiny-dinov2",
    "inception": "builtin:tiny-inception",
}
WIDTHS = {"clip": 16, "dino": 32, "dinov2": 32, "inception": 32}


def _images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_each_builtin_gives_float32_cpu_features_of_its_width(kind):
    with load_evaluator(kind, BUILTINS[kind], batch_size=2) as evaluator:
        assert (evaluator.kind, evaluator.name) == (kind, BUILTINS[kind])
        features = evaluator.image_features(_images(5))
        assert features.shape == (5, WIDTHS[kind]) and features.dtype == torch.float32
        assert features.device.type == "cpu" and torch.isfinite(features).all()
        assert not torch.allclose(features[0], features[1])  # the image matters
        # Batches of 2 (3 forward passes) give what one batch of 5 gives.
        evaluator.batch_size = 5
        assert torch.allclose(evaluator.image_features(_images(5)), features, atol=1e-5)
        assert evaluator.image_features([]).shape == (0, WIDTHS[kind])


@pytest.mark.parametrize(
    ("kind", "build"),
    [("clip", build_tiny_clip), ("dino", build_tiny_dino), ("dinov2", build_tiny_dinov2)],
)
def test_a_builtin_is_the_saved_model_loaded_back(kind, build):
    """The cache folder holds save_pretrained files, and the loaded weights are the built ones (a model that
    from_pretrained failed to fill would be freshly random)."""
    folder = materialise_tiny_evaluator(BUILTINS[kind])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model, _ = build(0)
    loaded = load_evaluator(kind, BUILTINS[kind])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_tiny_inception_loads_through_from_pretrained_and_takes_uint8_299():
    model = build_tiny_inception(0)
    images = _images(3, seed=1)
    with load_evaluator("inception", BUILTINS["inception"]) as evaluator:
        features, logits = evaluator.features_and_logits(images)
        assert features.shape == (3, 32) and logits.shape == (3, 10)
        assert torch.equal(evaluator.image_features(images), features)
        expected_features, expected_logits = model(inception_input(images))
        assert torch.allclose(features, expected_features) and torch.allclose(logits, expected_logits)
    batch = inception_input(images)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 299, 299)
    resized = np.asarray(images[0].resize((299, 299), Image.Resampling.BICUBIC))
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), resized)  # PIL bicubic, not a library's resize
    with pytest.raises(ValueError, match="uint8 images"):
        model(batch.float())


def test_a_local_folder_loads(tmp_path):
    folder = save_tiny_dino(tmp_path / "my-dino", seed=3)
    images = _images(2)
    with load_evaluator("dino", str(folder)) as local, load_evaluator("dino", BUILTINS["dino"]) as builtin:
        assert local.name == str(folder) and local.digest != builtin.digest
        assert not torch.allclose(local.image_features(images), builtin.image_features(images))  # seed 3 vs 0


def test_clip_text_features_are_the_projected_text_embeddings():
    model, processor = build_tiny_clip(0)
    prompts = [
        "a photo of sks dog",
        "a watercolor of a harbour at night",
        "x " * 200,
    ]  # the last is truncated
    with load_evaluator("clip", BUILTINS["clip"], batch_size=2) as clip:
        text = clip.text_features(prompts)
        image = clip.image_features(_images(2))
    assert text.shape == (3, 16) and image.shape == (2, 16) and text.dtype == torch.float32
    tokens = processor.tokenizer(prompts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(text[:2], expected, atol=1e-5)


def test_dino_takes_the_class_token_and_dinov2_its_pooler_output():
    images = _images(3, seed=2)
    with load_evaluator("dino", BUILTINS["dino"]) as dino:
        assert not hasattr(dino.model, "pooler") or dino.model.pooler is None  # DINO's pooler is untrained
        pixels = dino.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            tokens = dino.model(pixel_values=pixels).last_hidden_state  # [3, 17, 32]
        features = dino.image_features(images)
    assert torch.allclose(features, tokens[:, 0], atol=1e-6)
    assert not torch.allclose(features, tokens.mean(dim=1), atol=1e-3)
    with load_evaluator("dinov2", BUILTINS["dinov2"]) as dinov2:
        assert type(dinov2.model).__name__ == "Dinov2Model"
        pixels = dinov2.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = dinov2.model(pixel_values=pixels)
        features = dinov2.image_features(images)
    assert torch.allclose(features, out.pooler_output, atol=1e-6)
    assert not torch.allclose(features, out.last_hidden_state.mean(dim=1), atol=1e-3)


def test_the_digest_is_stable_and_names_model_and_preprocessing():
    first, again = load_evaluator("dino", BUILTINS["dino"]), load_evaluator("dino", BUILTINS["dino"])
    v2 = load_evaluator("dinov2", BUILTINS["dinov2"])
    half = load_evaluator("dino", BUILTINS["dino"], dtype=torch.bfloat16)
    assert first.digest == again.digest
    assert len({first.digest, v2.digest, half.digest}) == 3


def test_a_hub_id_that_is_not_cached_names_itself_and_the_download_command():
    with pytest.raises(EvaluatorError) as caught:
        load_evaluator("clip", "loratk-tests/no-such-clip")
    message = str(caught.value)
    assert message.startswith("eval.clip: cannot load 'loratk-tests/no-such-clip'")
    assert "hub is offline" in message and "hf download loratk-tests/no-such-clip" in message


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        (
            "dino",
            "builtin:tiny-clip",
            "eval.dino: 'builtin:tiny-clip' is a 'clip' model; expected vit or dinov2",
        ),
        ("clip", "./no-such-folder", "eval.clip: './no-such-folder': no such folder"),
        ("clip", "builtin:tiny-nothing", "eval.clip: unknown built-in 'builtin:tiny-nothing'"),
        ("inception", "", 'eval.inception is "": that metric is switched off'),
        ("inception", "/no/such/weights.pth", "eval.inception: '/no/such/weights.pth': no such file"),
        (
            "inception",
            "builtin:tiny-dino",
            "eval.inception: cannot load 'builtin:tiny-dino' as a TinyInception",
        ),
        ("lpips", "x", "unknown evaluator kind 'lpips'"),
    ],
)
def test_wrong_names_say_what_is_expected(kind, name, message):
    with pytest.raises(EvaluatorError, match=f"^{message}"):
        load_evaluator(kind, name)


def test_missing_torch_fidelity_explains_the_torchvision_trap():
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torch-fidelity imports here")
    with pytest.raises(EvaluatorError) as caught:
        load_evaluator("inception", "torch-fidelity")
    message = str(caught.value)
    assert message.startswith("eval.inception: cannot import torch-fidelity")
    assert "torchvision" in message and "CUDA builds that replace a CPU torch" in message
    assert 'eval.inception = ""' in message


def test_close_frees_the_model():
    evaluator = load_evaluator("dino", BUILTINS["dino"])
    evaluator.close()
    assert evaluator.model is None
    with pytest.raises(EvaluatorError, match="was closed"):
        evaluator.image_features(_images(1))


class _Counting:
    """Counts the images that reach the real model's forward pass."""

    def __init__(self, evaluator):
        self.evaluator, self.seen = evaluator, 0
        forward = evaluator._encode_images if evaluator.kind != "inception" else evaluator._forward
        name = "_encode_images" if evaluator.kind != "inception" else "_forward"

        def counted(images):
            self.seen += len(images)
            return forward(images)

        setattr(evaluator, name, counted)


def _write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(_images(n, seed=5)):
        paths.append(folder / f"{i:02d}.png")
        image.save(paths[-1])
    return paths


def test_the_feature_cache_computes_once_and_recomputes_an_edited_image(tmp_path):
    paths = _write_images(tmp_path / "train", 4)
    evaluator = load_evaluator("dino", BUILTINS["dino"], batch_size=3)
    counter = _Counting(evaluator)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.image_features(evaluator, paths)
    assert counter.seen == 4 and cache.path_for(evaluator).is_file()
    assert torch.allclose(first, evaluator.image_features([Image.open(p) for p in paths]), atol=1e-6)
    counter.seen = 0
    # A new cache object and a freshly loaded evaluator: the features come from the file, not the model.
    reloaded = load_evaluator("dino", BUILTINS["dino"], batch_size=3)
    counter = _Counting(reloaded)
    assert torch.equal(FeatureCache(tmp_path / "cache").image_features(reloaded, paths), first)
    assert counter.seen == 0
    _images(1, seed=99)[0].save(paths[2])  # edit one image
    again = FeatureCache(tmp_path / "cache").image_features(reloaded, paths)
    assert counter.seen == 1
    assert not torch.allclose(again[2], first[2]) and torch.equal(again[[0, 1, 3]], first[[0, 1, 3]])
    # Another evaluator has its own file.
    other = load_evaluator("dinov2", BUILTINS["dinov2"])
    assert cache.path_for(other) != cache.path_for(reloaded)
    assert cache.image_features(other, paths).shape == (4, 32)


def test_the_feature_cache_keeps_inception_logits_and_reads_images_upright(tmp_path):
    upright = _images(1, seed=7, size=(40, 24))[0]
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says: rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "train" / "sideways.png"
    path.parent.mkdir()
    rotated.save(path, exif=exif)
    evaluator = load_evaluator("inception", BUILTINS["inception"])
    counter = _Counting(evaluator)
    cache = FeatureCache(tmp_path / "cache")
    features, logits = cache.features_and_logits(evaluator, [path])
    assert counter.seen == 1 and features.shape == (1, 32) and logits.shape == (1, 10)
    expected = evaluator.features_and_logits([upright])
    assert torch.allclose(features, expected[0], atol=1e-6) and torch.allclose(logits, expected[1], atol=1e-6)
    assert not torch.allclose(features, evaluator.image_features([rotated]), atol=1e-4)
    counter.seen = 0
    assert torch.equal(cache.image_features(evaluator, [path]), features) and counter.seen == 0
    dino = load_evaluator("dino", BUILTINS["dino"])
    with pytest.raises(TypeError, match="only Inception"):
        cache.features_and_logits(dino, [path])
