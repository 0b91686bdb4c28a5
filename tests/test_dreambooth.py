"""DreamBooth (full) and DreamBooth-LoRA on the tiny SDXL: prior loss, class images, what trains, exports."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loratk.core.diffusion_math import compute_prior_preservation_loss
from loratk.core.protocols import LossOutput
from loratk.objectives.dreambooth import DreamBoothObjective
from loratk.recipe import validate_recipe
from loratk.run import TrainingRun


def db_recipe(tmp_path, model_dir, images_dir, method="dreambooth", **sections):
    raw = {
        "name": "db",
        "method": method,
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"resolution": 64},
        "dreambooth": {
            "instance_dir": str(images_dir),
            "instance_prompt": "a picture of sks",
            "class_prompt": "a picture of a landscape",
            "class_dir": str(tmp_path / "class"),
            "num_class_images": 3,
            "class_steps": 2,
            "class_batch_size": 2,
        },
        "lora": {"rank": 4, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no"},
        "optim": {"name": "adamw"},
        "export": {"dtype": "fp32"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return validate_recipe(raw, source="test")


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize(
    "instance, cls, weight, expected", [(0.5, 0.2, 1.0, 0.7), (0.5, 0.2, 0.5, 0.6), (1.0, 3.0, 0.0, 1.0)]
)
def test_prior_preservation_loss_by_hand(instance, cls, weight, expected):
    got = compute_prior_preservation_loss(torch.tensor(instance), torch.tensor(cls), weight)
    assert got.item() == pytest.approx(expected)


class _FakeDenoiser:
    def encode_batch(self, batch):
        return {"latents": batch["losses"]}

    def per_sample_loss(self, inputs):
        return inputs["latents"]


def test_objective_splits_instance_and_class_halves():
    objective = DreamBoothObjective(_FakeDenoiser(), prior_loss_weight=0.5)
    out = objective.compute_loss({"losses": torch.tensor([1.0, 2.0, 3.0, 5.0]), "num_instance": 2})
    assert isinstance(out, LossOutput) and out.num_images == 2
    # instance mean(1, 2) = 1.5, class mean(3, 5) = 4, 1.5 + 0.5 * 4 = 3.5
    assert out.loss.item() == pytest.approx(3.5)
    assert out.logs["train/prior_loss"].item() == pytest.approx(4.0)
    alone = objective.compute_loss({"losses": torch.tensor([1.0, 2.0]), "num_instance": 2})
    assert alone.loss.item() == pytest.approx(1.5)


# ---------------------------------------------------------------- recipes


def test_dreambooth_recipes_are_validated(tmp_path):
    from loratk.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"dreambooth: method 'dreambooth' needs a \[dreambooth\]"):
        validate_recipe({"name": "x", "method": "dreambooth"})
    with pytest.raises(RecipeError, match="data.dir: required for method 'lora'"):
        validate_recipe({"name": "x"})
    with pytest.raises(RecipeError) as info:
        validate_recipe(
            {
                "name": "x",
                "method": "dreambooth",
                "dreambooth": {"instance_dir": "i", "instance_prompt": "p"},
                "optim": {"fused_backward": True},
                "train": {"gradient_accumulation_steps": 2},
                "export": {"extract_lora_rank": 0},
            }
        )
    text = "\n".join(info.value.problems)
    assert "export.extract_lora_rank: must be > 0" in text
    with pytest.raises(RecipeError) as info:
        validate_recipe(
            {
                "name": "x",
                "method": "dreambooth",
                "dreambooth": {"instance_dir": "i", "instance_prompt": "p"},
                "optim": {"fused_backward": True},
                "train": {"gradient_accumulation_steps": 2},
            }
        )
    problems = info.value.problems
    assert any(p.startswith("dreambooth.class_prompt: required") for p in problems)
    assert any(p.startswith("optim.fused_backward: steps each weight") for p in problems)


# ---------------------------------------------------------------- class images


def test_class_images_are_generated_up_to_the_count_and_reused(tmp_path, tiny_sdxl_dir):
    from loratk.models.sdxl import load_sdxl
    from loratk.sampling.class_images import generate_class_images, list_class_images
    from loratk.sampling.images import read_png_parameters

    model = load_sdxl(str(tiny_sdxl_dir))
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "mine.png")  # a user's own class image counts
    kwargs = dict(class_dir=folder, prompt="a photo of a dog", size=(64, 64), steps=2, batch_size=2, seed=5)
    made = generate_class_images(model, num_images=4, progress=False, **kwargs)
    assert len(made) == 3 and len(list_class_images(folder)) == 4
    with Image.open(made[0]) as image:
        assert image.size == (64, 64)
        assert image.text["loratk.class_prompt"] == "a photo of a dog" and image.text["loratk.seed"] == "5"
    params = read_png_parameters(made[1])
    assert params["prompt"] == "a photo of a dog" and params["seed"] == 6
    assert generate_class_images(model, num_images=4, progress=False, **kwargs) == []
    # Resumable: a lost image is remade with its own seed, identical to the first time.
    lost = made[1].read_bytes()
    made[1].unlink()
    assert generate_class_images(model, num_images=4, progress=False, **kwargs) == [made[1]]
    assert made[1].read_bytes() == lost


# ---------------------------------------------------------------- training and export


def _snapshot(model):
    return {
        f"{part}.{name}": p.detach().clone()
        for part in ("unet", "vae", "text_encoder", "text_encoder_2")
        for name, p in getattr(model, part).named_parameters()
    }


def _inputs():
    torch.manual_seed(0)
    return (
        torch.randn(1, 4, 8, 8),
        torch.tensor([400]),
        torch.randn(1, 77, 80),
        {"text_embeds": torch.randn(1, 48), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    )


def _unet_out(unet, inputs):
    sample, t, enc, cond = inputs
    with torch.no_grad():
        return unet(sample, t, enc, added_cond_kwargs=cond).sample


def test_full_dreambooth_trains_the_unet_only_and_exports_a_loadable_single_file(
    tmp_path, tiny_sdxl_dir, images_dir
):
    from diffusers import StableDiffusionXLPipeline

    recipe = db_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, train={"epochs": 2}, export={"extract_lora_rank": 4}
    )
    run = TrainingRun(recipe)
    run.setup()
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    before = _snapshot(run.model)
    result = run.train()
    assert result.global_step == 6
    after = _snapshot(run.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[0] for k in changed} == {"unet"}
    assert len([k for k in changed if k.startswith("unet.")]) > 0.9 * len(
        [k for k in before if k.startswith("unet.")]
    )
    assert all(p.dtype == torch.float32 for p in run.model.unet.parameters())

    names = {p.name for p in run.run_dir.iterdir()}
    assert {"db.safetensors", "db_diffusers", "db.lora.safetensors", "epoch2.safetensors"} <= names
    assert "epoch1.safetensors" not in names  # full weights: final epoch only by default
    with safe_open(str(run.run_dir / "db.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert "model.diffusion_model.input_blocks.4.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(run.run_dir / "db.safetensors"), config=str(tiny_sdxl_dir)
    )
    inputs = _inputs()
    torch.testing.assert_close(
        _unet_out(pipe.unet, inputs), _unet_out(run.model.unet, inputs), rtol=1e-3, atol=1e-5
    )
    for part in ("vae", "text_encoder"):
        loaded, live = getattr(pipe, part).state_dict(), getattr(run.model, part).state_dict()
        assert all(torch.equal(loaded[k], live[k]) for k in live), part
    folder = StableDiffusionXLPipeline.from_pretrained(run.run_dir / "db_diffusers")
    torch.testing.assert_close(
        _unet_out(folder.unet, inputs), _unet_out(run.model.unet, inputs), rtol=1e-3, atol=1e-5
    )


def test_open_clip_g_round_trips_through_diffusers_converter(tiny_sdxl_dir):
    # The tiny CLIP-L and CLIP-G have the same width, so from_single_file cannot tell them apart; check the
    # OpenCLIP-G part against diffusers' own converter instead.
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from loratk.export.single_file import OPEN_CLIP_PREFIX
    from loratk.models.sdxl import SDXL, load_sdxl

    model = load_sdxl(str(tiny_sdxl_dir))
    sgm = SDXL.single_file_state_dict(model, torch.float32)
    back = convert_open_clip_checkpoint(model.text_encoder_2, sgm, prefix=OPEN_CLIP_PREFIX)
    live = model.text_encoder_2.state_dict()
    assert set(back) == set(live) and all(torch.equal(back[k], live[k]) for k in live)


def test_extracted_lora_full_rank_reproduces_and_low_rank_helps(tmp_path, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    from loratk.adapters.full import FullAdapter
    from loratk.models.sdxl import load_sdxl

    model = load_sdxl(str(tiny_sdxl_dir))
    adapters = {rank: FullAdapter(export_dtype="fp32", extract_lora_rank=rank) for rank in (64, 2)}
    for adapter in adapters.values():
        adapter.apply(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "fine-tune" the LoRA targets only, with a decaying spectrum as training gives
        for weight in adapters[64]._extract_targets(model)["unet"].values():
            out_f, in_f = weight.shape
            u, v = torch.randn(out_f, 4, generator=gen), torch.randn(4, in_f, generator=gen)
            weight.add_(0.02 * u @ torch.diag(torch.tensor([1.0, 0.5, 0.1, 0.05])) @ v)
    inputs = _inputs()
    tuned = _unet_out(model.unet, inputs)
    errors = {}
    for rank, adapter in adapters.items():
        path = tmp_path / f"r{rank}.lora.safetensors"
        adapter._export_lora(model, path, {})
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        if rank == 64:
            base_error = (_unet_out(pipe.unet, inputs) - tuned).norm()
        pipe.load_lora_weights(str(path))
        errors[rank] = (_unet_out(pipe.unet, inputs) - tuned).norm()
        if rank == 64:
            torch.testing.assert_close(_unet_out(pipe.unet, inputs), tuned, rtol=1e-3, atol=1e-4)
    assert errors[2] < base_error, (errors, base_error)


def test_dreambooth_lora_export_loads_and_matches(tmp_path, tiny_sdxl_dir, images_dir):
    from diffusers import StableDiffusionXLPipeline

    recipe = db_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, method="dreambooth-lora", train={"learning_rate": 1e-2}
    )
    run = TrainingRun(recipe)
    run.setup()
    before = _snapshot(run.model)
    run.train()
    after = _snapshot(run.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    path = run.run_dir / "db.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118
        assert f.metadata()["loratk.method"] == "dreambooth-lora"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    inputs = _inputs()
    base = _unet_out(pipe.unet, inputs)
    pipe.load_lora_weights(str(path))
    loaded = _unet_out(pipe.unet, inputs)
    torch.testing.assert_close(loaded, _unet_out(run.model.unet, inputs), rtol=1e-3, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-4


def test_full_dreambooth_with_text_encoders_fused_adafactor_and_checkpointing(
    tmp_path, tiny_sdxl_dir, images_dir
):
    recipe = db_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        dreambooth={"prior_preservation": False},
        full={"train_text_encoders": True},
        train={"gradient_checkpointing": True, "max_steps": 2},
        optim={"name": "adafactor", "fused_backward": True},
    )
    run = TrainingRun(recipe)
    run.setup()
    before = _snapshot(run.model)
    assert run.train().global_step == 2
    after = _snapshot(run.model)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
    assert not (tmp_path / "class").exists()


def test_instance_images_use_their_caption_or_fall_back_to_the_instance_prompt(images_dir, tmp_path):
    from loratk.data.dataset import DataError
    from loratk.data.dreambooth import scan_instance_folder

    (images_dir / "boat.txt").unlink()
    records = {r.path.name: r.caption for r in scan_instance_folder(images_dir, "a picture of sks")}
    assert records["boat.png"] == "a picture of sks"
    assert records["pine.png"] == (images_dir / "pine.txt").read_text().strip()
    (images_dir / "pine.txt").write_text("  ")
    with pytest.raises(DataError, match="pine.txt: caption is empty"):
        scan_instance_folder(images_dir, "a picture of sks")
    with pytest.raises(DataError, match="no instance images; set dreambooth.instance_dir"):
        scan_instance_folder(tmp_path, "x")
