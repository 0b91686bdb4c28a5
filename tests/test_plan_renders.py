"""`loratk plan` beyond the training step: samples and class images (`memory.render`) and the image metrics'
evaluators (`memory.evaluators`), each checked against the real code path run on real tensors, and what the
command prints and returns when one of them does not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import make_recipe
from loratk.memory.estimate import estimate_memory, fake_run, run_step, warm_up_optimizer, with_margin
from loratk.memory.render import RenderJob, parts_on_device, render_jobs, run_render


def _recipe(tmp_path, **sections):
    sections.setdefault("lora", {"rank": 4, "alpha": 4, "targets": "attention"})
    return make_recipe(tmp_path, "builtin:tiny-sdxl", tmp_path / "images", **sections)


def _db_recipe(tmp_path, class_batch_size):
    from loratk.recipe import validate_recipe

    raw = {
        "name": "db",
        "method": "dreambooth-lora",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": "builtin:tiny-sdxl"},
        "data": {"resolution": 64},
        "dreambooth": {
            "instance_dir": str(tmp_path / "images"),
            "instance_prompt": "a picture of sks",
            "class_prompt": "a picture of a landscape",
            "class_batch_size": class_batch_size,
        },
        "lora": {"rank": 4, "alpha": 4, "targets": "attention"},
        "train": {"batch_size": 1, "mixed_precision": "no"},
        "optim": {"name": "adamw"},
        "eval": {"every_n_epochs": 0},
    }
    return validate_recipe(raw, source="test")


def _pipeline_peak(run, job: RenderJob) -> int:
    """The peak the tracker counts while the real sampler renders `job` (the diffusers pipeline to latents,
    then `vae_decode`), on the run's real tensors, with the encoders on the device as the sampler has them."""
    from loratk.models.tiny import build_tiny_tokenizer
    from loratk.sampling.pipeline import build_pipeline, vae_decode

    tokenizers = {name: build_tiny_tokenizer() for name in run.model.tokenizers}
    with parts_on_device(run), torch.no_grad():
        pipe = build_pipeline(dataclasses.replace(run.model, tokenizers=tokenizers))
        run.tracker.reset_peak()
        latents = pipe(
            prompt="a cat",
            width=job.width,
            height=job.height,
            num_inference_steps=2,
            guidance_scale=job.guidance,
            generator=[torch.Generator("cpu").manual_seed(1)],
            output_type="latent",
        ).images
        vae_decode(pipe.vae, latents)
        return run.tracker.breakdown().total


@pytest.mark.parametrize("model", ["builtin:tiny-sdxl", "builtin:tiny-sd15"])
def test_sample_estimate_matches_the_sampler_on_real_tensors(tmp_path, model):
    recipe = _recipe(
        tmp_path,
        model={"path": model},
        sample={"prompts": ["a cat --w 96 --h 64"], "guidance": 5.0},
        train={"mixed_precision": "no"},
    )
    (job,) = render_jobs(recipe)
    assert (job.what, job.width, job.height, job.unet_batch) == ("samples", 96, 64, 2)
    with fake_run(recipe, device_type="cpu", real=True) as run:
        warm_up_optimizer(run)
        estimate = run_render(run, job)
        measured = _pipeline_peak(run, job)
    assert estimate.peak.total == pytest.approx(measured, rel=0.02)


def test_samples_bring_the_encoders_back_beside_the_optimizer_state(tmp_path):
    recipe = _recipe(tmp_path, sample={"prompts": ["a cat"]}, data={"cache_latents": True})
    (job,) = render_jobs(recipe)
    with fake_run(recipe) as run:
        assert run.extras["offloaded"]  # the caches take the VAE and the text encoders off the card
        step = run_step(run, 2).peak
        samples = run_render(run, job).peak
        bigger = run_render(run, dataclasses.replace(job, width=256, height=256)).peak
    assert samples.by_category["weights"] > step.by_category["weights"]  # they are back on it to sample
    assert samples.by_category["optimizer"] == step.by_category["optimizer"] > 0
    assert samples.by_category["gradients"] == 0  # freed by zero_grad before the hook runs
    assert bigger.total > samples.total


def test_class_images_come_before_the_optimizer_and_grow_with_their_batch(tmp_path):
    estimate = estimate_memory(_db_recipe(tmp_path, 1), batch_sizes=(1, 2), renders=True)
    (classes,) = [r for r in estimate.renders if r.job.what == "class images"]
    assert classes.job.unet_batch == 2 and classes.job.override == "dreambooth.class_batch_size"
    assert classes.peak.by_category["optimizer"] == 0  # generated before training starts
    assert estimate.points[0].peak.by_category["optimizer"] > 0
    (job,) = [j for j in render_jobs(_db_recipe(tmp_path, 3)) if j.what == "class images"]
    with fake_run(_db_recipe(tmp_path, 3)) as run:
        assert run_render(run, job).peak.total > classes.peak.total


@pytest.mark.parametrize("kind", ["clip", "dinov2", "inception"])
def test_evaluator_estimate_matches_the_evaluator_on_real_tensors(tmp_path, kind):
    """The evaluator's own weights exactly, and its forward pass at eval.batch_size within 10%, against the
    real evaluator (loaded through from_pretrained, fed PIL images) counted by the same tracker."""
    from PIL import Image

    from loratk.evaluation.evaluators import load_evaluator
    from loratk.memory.evaluators import build_meta_evaluators, run_evaluator
    from loratk.memory.tracker import MemoryTracker

    name = f"builtin:tiny-{kind}"
    recipe = _recipe(
        tmp_path,
        sample={"prompts": ["a cat"]},
        eval={"every_n_epochs": 1, "clip": "", "dino": "", "dinov2": "", "inception": "", kind: name},
        data={"cache_dir": str(tmp_path / "cache")},
    )
    (meta,) = build_meta_evaluators(recipe)
    with fake_run(recipe, device_type="cpu") as run:
        before, run_weights = run.tracker.current, run.tracker.totals["weights"]
        estimate = run_evaluator(run, meta, batch_size=8)
    images = [Image.new("RGB", (48, 40), (i * 20, 90, 200 - i * 10)) for i in range(8)]
    evaluator = load_evaluator(kind, name, batch_size=8, cache_dir=tmp_path / "cache")
    with MemoryTracker() as tracker:
        tracker.track(list(evaluator.model.parameters()) + list(evaluator.model.buffers()), "weights")
        weights = tracker.current
        tracker.reset_peak()
        evaluator.image_features(images)
        measured = tracker.breakdown()
    assert estimate.peak.by_category["weights"] - run_weights == weights
    forward = estimate.peak.total - before - weights
    assert forward == pytest.approx(measured.total - weights, rel=0.10)


def test_plan_prints_what_runs_beside_training_and_exits_1_when_samples_do_not_fit(tmp_path, capsys):
    from loratk.cli import main

    path = tmp_path / "tiny.toml"
    path.write_text(
        'name = "tiny"\nmethod = "lora"\n[model]\npath = "builtin:tiny-sdxl"\n'
        '[data]\ndir = "images"\nresolution = 64\n[lora]\nrank = 4\ntargets = "attention"\n'
        '[train]\nbatch_size = 1\nmixed_precision = "no"\n[optim]\nname = "adamw"\n'
        '[sample]\nprompts = ["a cat --w 512 --h 512"]\n'
        '[eval]\nclip = "builtin:tiny-clip"\ndino = ""\ndinov2 = ""\ninception = "torch-fidelity"\n'
    )
    with fake_run(_recipe(tmp_path, train={"batch_size": 1}), device_type="cpu") as run:
        train_peak = run_step(run, 1).peak.total
    budget = (
        with_margin(train_peak) + 2 * 2**20
    )  # room for the step (and a few more images), not the 512² decode
    assert main(["plan", str(path), "--memory", str(budget), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "samples at 512x512 (1 image a batch, the UNet at batch 2 (guidance))" in out
    assert "decoding at vae." in out and "does not fit: lower sample.size" in out
    assert "evaluator clip builtin:tiny-clip (float32, batch 16)" in out
    assert "evaluator inception torch-fidelity (float32, batch 16): not estimated" in out
