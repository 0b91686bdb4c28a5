"""GAN baselines trained end to end on tiny coloured shapes, the way a user runs them: the run folder and its
metrics, the report and `loratk compare` beside a diffusion run, exact resume after an interruption, bad
images, the NaN guard, and a generator that gets closer to the data (lower KID in a tiny feature space)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tomli_w
import torch
from PIL import Image, ImageDraw
from run_folders import make_run

from loratk.core.interrupts import StopRequest, TrainingInterrupted
from loratk.recipe import validate_recipe
from loratk.run import train

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 160, 30)]
EPOCHS = 4  # of the KID test: 4 x 120 items / batch 8 = 60 steps


def write_shapes(folder: Path, count: int = 24, side: int = 40) -> Path:
    """Squares and discs of three colours on a light background, at random places."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(count):
        image = Image.new("RGB", (side, side), (240, 240, 240))
        x, y = rng.randint(2, side // 2), rng.randint(2, side // 2)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)([x, y, x + side // 2, y + side // 2], fill=COLOURS[i % 3])
        image.save(folder / f"{i:02d}.png")
    return folder


def gan_raw(tmp_path: Path, images: Path, method: str = "wgan-gp", name: str = "gan", **gan) -> dict:
    return {
        "name": name,
        "method": method,
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "data": {"dir": str(images)},
        "train": {"epochs": 2, "batch_size": 8},
        "gan": {
            "resolution": 32,
            "latent_dim": 16,
            "g_width": 8,
            "d_width": 8,
            "sample_seeds": [0, 1, 2, 3],
            "interpolation_steps": 4,
            "eval_images": 16,
            "inception": "builtin:tiny-inception",
            **gan,
        },
    }


@pytest.fixture
def restore_logging():
    """`loratk.train.main` configures logging: the root logger's handler is restored afterwards, and the
    libraries' own handlers are created first, on the session's stderr, not on this test's `capsys` stream
    (closed after the test: later tests' diffusers errors would then print "--- Logging error ---")."""
    import logging

    import diffusers
    import transformers

    for library in (transformers, diffusers):
        library.utils.logging.get_logger(library.__name__)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


@pytest.fixture
def shapes(tmp_path) -> Path:
    return write_shapes(tmp_path / "shapes")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_gan_run_writes_its_folder_and_compare_shows_it_beside_a_diffusion_run(
    restore_logging, tmp_path, shapes, capsys
):
    from loratk.cli import main as cli
    from loratk.evaluation.runs import load_run
    from loratk.train import main

    recipe = tmp_path / "gan.toml"
    raw = gan_raw(tmp_path, shapes, diffusion=True, critic_steps=2)
    recipe.write_text(tomli_w.dumps(raw))
    assert main([str(recipe)]) == 0
    run = tmp_path / "runs" / "gan"
    for name in ("epoch1.safetensors", "epoch2.safetensors", "gan.safetensors", "recipe.resolved.toml"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "samples" / "epoch002").iterdir()) == [
        f"{i:02d}-seed{i - 1}.png" for i in range(1, 5)
    ]
    assert (run / "samples" / "grid.png").is_file()
    assert (run / "samples" / "interpolation" / "epoch002.png").is_file()
    rows = _rows(run / "metrics.jsonl")
    steps = [r for r in rows if "train/d_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 24 images / batch 8 = 3 steps an epoch
    assert all(
        {"train/wasserstein", "train/gradient_penalty", "aug/t_limit", "aug/p"} <= set(r) for r in steps
    )
    assert [r["step"] for r in steps if "train/g_loss" in r] == [2, 4, 6]  # 2 critic steps per G step
    epochs = [r for r in rows if "time/epoch_s" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("eval/kid" in r and "eval/fid" in r for r in epochs)
    summary = load_run(run)
    assert summary.method == "wgan-gp" and summary.base_model is None  # trained from scratch
    assert {"fid", "kid", "kid_std", "is"} <= set(summary.per_epoch[2])
    assert summary.counts[2] == {"generated": 16, "real": 24}
    assert summary.samples[2] == run / "samples" / "epoch002" and summary.grid is not None
    assert summary.peak_memory_key in ("mem/peak_rss_gib", "mem/peak_gib")
    report = (run / "report.html").read_text()
    assert "wgan-gp" in report and "KID" in report and "samples/grid.png" in report

    lora = make_run(tmp_path / "runs", "style-lora", image_metrics={1: {"kid": 0.5, "fid": 9.0, "dino": 0.4}})
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert cli(["compare", str(lora), str(run), "--out", str(out)]) == 0
    header, _, *lines = capsys.readouterr().out.splitlines()
    assert "KID ↓" in header and "FID ↓" in header
    gan_line = next(line for line in lines if line.startswith("gan "))
    assert gan_line.split()[1] == "wgan-gp" and "(kid)" in gan_line  # its best epoch, chosen on KID
    assert next(line for line in lines if line.startswith("style-lora")).split()[1] == "lora"
    assert (out / "compare.html").is_file()


class StopAfter(StopRequest):
    """A stop request that arrives after `polls` checks: the loop asks once per step and once per epoch end."""

    def __init__(self, polls: int):
        super().__init__()
        self.polls = polls

    @property
    def requested(self) -> bool:
        self.polls -= 1
        if self.polls < 0:
            self.request("SIGTERM")
        return self.signal_name is not None


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = sorted((run / "state").glob("step-*"))[-1]
    return {
        f"{f.name}:{k}": v for f in sorted(state.glob("model*.safetensors")) for k, v in load_file(f).items()
    }


def test_an_interrupted_run_resumes_bit_identically(tmp_path, shapes):
    gan = {
        "diffusion": True,
        "diffusion_interval": 3,
        "diffusion_kimg": 0.1,
        "diffusion_target": 0.1,
        "critic_steps": 2,
    }
    whole = validate_recipe(gan_raw(tmp_path / "a", shapes, **gan))
    train(whole)
    cut = validate_recipe(gan_raw(tmp_path / "b", shapes, **gan))
    with pytest.raises(TrainingInterrupted, match="stopped at step 4"):
        train(cut, stop=StopAfter(4))  # steps 1-3, epoch 1's end, then step 4: mid epoch 2, mid interval
    state = json.loads(
        next((cut.run_dir / "state").glob("step-00000004")).joinpath("loratk_state.json").read_text()
    )
    assert (state["epoch"], state["batches_done"]) == (2, 1)
    train(cut)
    a, b = whole.run_dir, cut.run_dir
    assert (a / "gan.safetensors").read_bytes() == (b / "gan.safetensors").read_bytes()
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any("running_mean" in k for k in wa)  # BatchNorm statistics too
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    def losses(run: Path) -> list[dict]:
        keep = ("train/", "aug/", "lr/", "eval/")
        return [
            {k: v for k, v in r.items() if k.startswith(keep)} | {"step": r["step"]}
            for r in _rows(run / "metrics.jsonl")
        ]

    assert losses(a) == losses(b)
    assert [r["aug/p"] for r in _rows(a / "metrics.jsonl") if "aug/p" in r][-1] > 0  # T moved during the run
    assert [r["metrics"] for r in _rows(a / "eval.jsonl")] == [r["metrics"] for r in _rows(b / "eval.jsonl")]


def test_bad_images_are_reported_or_skipped_as_in_the_other_trainers(tmp_path, shapes):
    from loratk.data.dataset import DataError

    (shapes / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match="broken.png"):
        train(validate_recipe(gan_raw(tmp_path, shapes, eval_every_n_epochs=0)))
    raw = gan_raw(tmp_path, shapes, method="dcgan", eval_every_n_epochs=0)
    raw["data"]["on_bad_image"] = "skip"
    raw["train"]["epochs"] = 1
    run = train(validate_recipe(raw), overwrite=True)
    assert "broken.png" in (run / "skipped.csv").read_text()
    assert [r["step"] for r in _rows(run / "metrics.jsonl") if "train/d_loss" in r] == [1, 2, 3]  # 24 good


def test_loratk_check_on_a_gan_recipe_checks_the_images_at_its_square_without_captions(
    tmp_path, shapes, capsys
):
    from loratk.cli import main

    recipe = tmp_path / "gan.toml"
    recipe.write_text(tomli_w.dumps(gan_raw(tmp_path, shapes)))
    assert main(["check", str(recipe)]) == 0  # 40 px images, no captions: fine for a 32 px GAN
    (shapes / "broken.png").write_bytes(b"")
    capsys.readouterr()
    assert main(["check", str(recipe)]) == 1
    printed = capsys.readouterr().out
    assert (
        "broken.png" in printed
        and "Result: 1 error(s)" in printed
        and "caption file is missing" not in printed
    )


def test_the_loop_stops_after_too_many_non_finite_steps(tmp_path, shapes):
    from accelerate import Accelerator

    from loratk.baselines.data import SquareImageDataset, build_image_dataloader
    from loratk.baselines.loop import run_gan_training
    from loratk.components.gan import build_gan_parts
    from loratk.core.loop import NonFiniteLossError

    recipe = validate_recipe(gan_raw(tmp_path, shapes, method="dcgan", g_lr=float("inf")))
    parts = build_gan_parts(recipe, device="cpu")
    loader = build_image_dataloader(
        SquareImageDataset(sorted(shapes.glob("*.png")), 32), batch_size=8, seed=0
    )
    accelerator = Accelerator(cpu=True)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        run_gan_training(
            accelerator, steps=parts.steps, dataloader=accelerator.prepare(loader), num_epochs=2,
            critic_steps=1, seed=0, max_nonfinite_steps=3,
        )  # fmt: skip


def _pooled_pixels(images: list) -> torch.Tensor:
    """A tiny feature space that sees colour and layout: each image as its 4 x 4 mean colours, [N, 48]."""
    batch = torch.stack(
        [torch.from_numpy(__import__("numpy").asarray(im, dtype="float32") / 255) for im in images]
    )
    return torch.nn.functional.avg_pool2d(batch.permute(0, 3, 1, 2), 8).flatten(1)


def test_training_lowers_kid_against_the_untrained_generator(tmp_path, shapes):
    from loratk.baselines.data import SquareImageDataset
    from loratk.baselines.outputs import build_fixed_latents, load_generator, render_images
    from loratk.components.gan import build_gan_parts
    from loratk.evaluation.metrics import kernel_distance

    raw = gan_raw(
        tmp_path, shapes, method="dcgan", g_lr=1e-3, eval_every_n_epochs=0, sample_every_n_epochs=EPOCHS
    )
    raw["train"]["epochs"] = EPOCHS
    raw["data"]["repeats"] = 5
    raw["export"] = {"every_n_epochs": EPOCHS}
    recipe = validate_recipe(raw)
    run = train(recipe)
    dataset = SquareImageDataset(sorted(shapes.glob("*.png")), 32)
    real = _pooled_pixels([dataset.load_square(i) for i in range(len(dataset))])
    latents = build_fixed_latents(range(100, 148), 16)

    def kid(generator: torch.nn.Module) -> float:
        return kernel_distance(real, _pooled_pixels(render_images(generator, latents)), seed=0)[0]

    untrained = build_gan_parts(recipe, device="cpu").generator  # the run's start: the same seeded init
    trained, _ = load_generator(run / "gan.safetensors")
    before, after = kid(untrained), kid(trained)
    assert after < 0.75 * before, (before, after)  # measured: 0.94 -> 0.6
