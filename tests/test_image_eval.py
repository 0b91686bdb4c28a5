"""Image metrics of a run: scoring rendered samples (every metric, and each kind of bad input as a note while
the rest goes on), the training-time hook, `loratk eval` reusing what was rendered, and `loratk compare` on
three real runs (LoRA, DreamBooth, DreamBooth+LoRA)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_recipe
from loratk.evaluation.defaults import IMAGE_METRICS
from loratk.evaluation.scoring import EvalImages, EvalSettings, score_images

TINY = {
    "clip": "builtin:tiny-clip",
    "dino": "builtin:tiny-dino",
    "dinov2": "builtin:tiny-dinov2",
    "inception": "builtin:tiny-inception",
}
SAMPLE = {"prompts": ["a red sun", "a boat at sea"], "seeds": [1], "steps": 2, "at_start": True}
EVAL = {**TINY, "every_n_epochs": None, "leak_prompts": ["a bowl of fruit"]}


def _pngs(folder: Path, n: int, seed: int, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _settings(tmp_path: Path, **evaluators: str) -> EvalSettings:
    return EvalSettings(
        metrics=list(IMAGE_METRICS), evaluators={**TINY, **evaluators}, cache_dir=tmp_path / "features"
    )


def _images(tmp_path: Path, n: int = 4) -> tuple[EvalImages, list[Path]]:
    generated = _pngs(tmp_path / "gen", n, seed=1)
    base, tuned = _pngs(tmp_path / "base", 2, seed=2), _pngs(tmp_path / "tuned", 2, seed=3)
    images = EvalImages(
        generated=[(p, f"prompt {i}") for i, p in enumerate(generated)],
        leak_pairs=list(zip(base, tuned, strict=True)),
    )
    return images, _pngs(tmp_path / "real", 5, seed=4)


def test_every_metric_is_computed_on_the_evaluators_features(tmp_path):
    from loratk.evaluation import metrics as m
    from loratk.evaluation.evaluators import load_evaluator

    images, real = _images(tmp_path)
    result = score_images(images, real, _settings(tmp_path))
    assert set(IMAGE_METRICS) <= set(result.metrics) and {"kid_std", "is_std", "kid_dinov2_std"} <= set(
        result.metrics
    )
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.counts == {"generated": 4, "real": 5, "pairs": 2}
    assert result.settings["resize"] and result.settings["clip"] == TINY["clip"]
    assert any("FID from 5 real / 4 generated" in note for note in result.notes)
    # The wiring: CLIP-I and CLIP-T are the cosines of this evaluator's own features, by hand.
    with load_evaluator("clip", TINY["clip"]) as clip:
        gen = clip.image_features([Image.open(p).convert("RGB") for p, _ in images.generated])
        ref = clip.image_features([Image.open(p).convert("RGB") for p in real])
        text = clip.text_features([prompt for _, prompt in images.generated])
    unit = torch.nn.functional.normalize
    assert result.metrics["clip_i"] == pytest.approx(float((unit(gen) @ unit(ref).T).mean()), abs=1e-6)
    assert result.metrics["clip_t"] == pytest.approx(float((unit(gen) * unit(text)).sum(1).mean()), abs=1e-6)

    def pixels(paths):
        return torch.stack(
            [torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255) for p in paths]
        )

    base, tuned = (pixels(side).permute(0, 3, 1, 2) for side in zip(*images.leak_pairs, strict=True))
    expected = m.psnr(base, tuned)
    assert result.metrics["psnr"] == pytest.approx(expected)


def test_a_missing_evaluator_is_a_note_and_the_other_metrics_go_on(tmp_path):
    images, real = _images(tmp_path)
    missing = str(tmp_path / "no-such-clip")
    result = score_images(images, real, _settings(tmp_path, clip=missing, inception=""))
    assert "clip_t" not in result.metrics and "clip_i" not in result.metrics
    assert any(n.startswith("clip_t, clip_i: skipped") and "no-such-clip" in n for n in result.notes)
    assert any(n == "kid, fid, is: skipped (eval.inception is empty)" for n in result.notes)
    assert {"dino", "fd_dinov2", "psnr"} <= set(result.metrics)


def test_too_few_images_for_a_metric_is_a_note(tmp_path):
    images, real = _images(tmp_path, n=1)
    result = score_images(images, real, _settings(tmp_path))
    assert "kid" not in result.metrics and "fid" not in result.metrics
    assert any(n.startswith("kid: ") and "at least 2" in n for n in result.notes)
    assert {"clip_t", "clip_i", "dino", "is"} <= set(result.metrics)


def test_a_model_that_gives_nan_names_the_image_and_the_others_go_on(tmp_path):
    """A NaN feature (here a CLIP whose projection is NaN) never becomes a NaN metric."""
    from safetensors.torch import load_file, save_file

    from loratk.evaluation.tiny import materialise_tiny_evaluator

    broken = tmp_path / "nan-clip"
    shutil.copytree(materialise_tiny_evaluator(TINY["clip"]), broken)
    weights = load_file(broken / "model.safetensors")
    weights["visual_projection.weight"] = torch.full_like(weights["visual_projection.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    images, real = _images(tmp_path)
    result = score_images(images, real, _settings(tmp_path, clip=str(broken)))
    assert "clip_t" not in result.metrics and "clip_i" not in result.metrics
    assert any("clip: image 0 (00.png) has non-finite values" in n for n in result.notes), result.notes
    assert {"dino", "kid", "psnr"} <= set(result.metrics)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_scores_each_epoch_and_loratk_eval_reuses_the_images(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.run import train
    from loratk.run_eval import evaluate_run

    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"epochs": 2},
        sample=SAMPLE,
        eval={**EVAL, "holdout": 1, "dinov2": str(tmp_path / "missing-dinov2")},
    )
    run_dir = train(recipe)  # one evaluator is missing: a note, and training ends normally
    evaluated = _rows(run_dir / "eval.jsonl")
    assert [r["epoch"] for r in evaluated] == [0, 1, 2]
    assert {"clip_t", "dino", "kid", "is"} <= set(evaluated[0]["metrics"]) and "psnr" not in evaluated[0][
        "metrics"
    ]
    assert {"psnr", "ssim"} <= set(evaluated[1]["metrics"])
    assert any("fd_dinov2, kid_dinov2: skipped" in n for n in evaluated[1]["notes"])
    epoch_rows = [r for r in _rows(run_dir / "metrics.jsonl") if "eval/clip_t" in r]
    assert [r["epoch"] for r in epoch_rows] == [1, 2]
    assert epoch_rows[0]["eval/clip_t"] == evaluated[1]["metrics"]["clip_t"]
    assert (run_dir / "eval" / "leak" / "base" / "01-seed1.png").is_file()
    report = (run_dir / "report.html").read_text()
    assert "CLIP-T" in report and "DINO" in report

    logs = []
    scores = evaluate_run(run_dir, log=logs.append)
    assert [s.epoch for s in scores] == [0, 1, 2] and all(s.rendered == 0 for s in scores)
    for score, trained in zip(scores, evaluated, strict=True):  # the same images, the same numbers
        assert score.result.metrics == pytest.approx(trained["metrics"])
    (run_dir / "samples" / "epoch001" / "02-seed1.png").unlink()
    (score,) = evaluate_run(run_dir, epochs=[1], log=logs.append)
    assert score.rendered == 1 and (run_dir / "samples" / "epoch001" / "02-seed1.png").is_file()
    assert _rows(run_dir / "eval.jsonl")[-1]["epoch"] == 1
    assert any(line.startswith("epoch 1: clip_t") and "1 rendered" in line for line in logs)


def test_loratk_eval_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    from loratk.cli import main

    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'recipe.resolved.toml'}: not found" in err and "Traceback" not in err


def test_compare_three_real_runs_one_per_method(tmp_path, tiny_sdxl_dir, images_dir, capsys):
    from loratk.cli import main
    from loratk.recipe import validate_recipe
    from loratk.run import train

    db = {
        "instance_dir": str(images_dir),
        "instance_prompt": "a picture of sks",
        "class_prompt": "a picture of a landscape",
        "prior_preservation": False,
    }
    sample = {**SAMPLE, "prompts": ["a red sun"]}
    quick = {**TINY, "every_n_epochs": None, "metrics": ["clip_t", "dino"]}
    runs = [train(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name="lora", sample=sample, eval=quick))]
    for method in ("dreambooth", "dreambooth-lora"):
        raw = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name=method, sample=sample, eval=quick)
        raw = raw.model_dump(exclude_none=True) | {"method": method, "dreambooth": db}
        raw["data"] = {"resolution": 64}
        raw["export"] = {"dtype": "fp32"}
        runs.append(train(validate_recipe(raw, source="test")))
    out = tmp_path / "compare"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for method in ("lora", "dreambooth", "dreambooth-lora"):
        assert f" {method} " in table
    assert "DINO" in table and (out / "compare.html").is_file() and (out / "compare.png").is_file()


def test_loratk_eval_says_a_gan_run_is_scored_while_it_trains(tmp_path):
    from helpers import REPO
    from loratk.recipe import dump_recipe, load_recipe
    from loratk.run_eval import EvalRunError, evaluate_run

    recipe = load_recipe(REPO / "recipes" / "quickstart_gan.toml")
    (tmp_path / "recipe.resolved.toml").write_text(dump_recipe(recipe))
    with pytest.raises(EvalRunError, match="a dcgan run scores its epochs while it trains"):
        evaluate_run(tmp_path)
