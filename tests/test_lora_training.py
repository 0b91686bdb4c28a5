"""LoRA training on the tiny SDXL: what trains, that it learns, and that the exported file reloads exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import make_recipe, step_rows
from loratk.run import TrainingRun

CONV_AND_LINEAR = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]


def _snapshot(model):
    return {
        f"{part}.{name}": p.detach().clone()
        for part in ("unet", "vae", "text_encoder", "text_encoder_2")
        for name, p in getattr(model, part).named_parameters()
    }


def _run(tmp_path, tiny_sdxl_dir, images_dir, **sections):
    run = TrainingRun(make_recipe(tmp_path, tiny_sdxl_dir, images_dir, **sections))
    run.setup()
    return run


def test_lora_params_change_and_frozen_params_do_not(tmp_path, tiny_sdxl_dir, images_dir):
    run = _run(tmp_path, tiny_sdxl_dir, images_dir, lora={"train_text_encoders": True}, train={"epochs": 1})
    before = _snapshot(run.model)
    run.train()
    after = _snapshot(run.model)
    lora = [k for k in before if ".lora_" in k]
    frozen = [k for k in before if ".lora_" not in k]
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    unchanged_lora = [k for k in lora if torch.equal(before[k], after[k])]
    changed_frozen = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not unchanged_lora, unchanged_lora[:3]
    assert not changed_frozen, changed_frozen[:3]
    trainable = [
        n
        for part in ("unet", "text_encoder")
        for n, p in getattr(run.model, part).named_parameters()
        if p.requires_grad
    ]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in run.model.unet.parameters() if p.requires_grad)


def _fixed_eval_loss(run, batch, noise, timesteps) -> float:
    with torch.no_grad():
        inputs = run.objective.denoiser.encode_batch(batch)
        return run.objective.denoiser.per_sample_loss(inputs, noise=noise, timesteps=timesteps).mean().item()


def test_training_lowers_the_loss_on_a_fixed_evaluation_set(tmp_path, tiny_sdxl_dir, images_dir):
    for extra in sorted(images_dir.iterdir())[8:]:  # keep 4 images (8 files)
        extra.unlink()
    run = _run(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        # The tiny UNet's full-resolution level has no attention, so the convs are trained too (LoCon-style).
        lora={"rank": 8, "alpha": 8, "targets": CONV_AND_LINEAR},
        # 30 steps bring the loss to about 0.6x (0.67x after 20, 0.44x after 100): a clear margin under 0.9x.
        train={"epochs": 15, "batch_size": 2, "learning_rate": 1e-2, "max_grad_norm": 1.0},
        optim={"name": "adamw"},
        export={"every_n_epochs": 1000},
    )
    assert len(run.dataset) == 4
    from loratk.data.dataset import collate_batch

    batch = collate_batch([run.dataset[i] for i in range(4)])
    gen = torch.Generator().manual_seed(123)
    latents_shape = (4, 4, 8, 8)
    noise = torch.randn(latents_shape, generator=gen)
    timesteps = torch.tensor([100, 300, 500, 700])
    torch.manual_seed(0)
    untrained = _fixed_eval_loss(run, batch, noise, timesteps)
    result = run.train()
    assert result.global_step == 30
    trained = _fixed_eval_loss(run, batch, noise, timesteps)
    assert trained <= 0.9 * untrained, (untrained, trained)


@pytest.mark.parametrize(
    "dtype, train_te, targets",
    [("fp32", True, "all-linear"), ("fp16", True, "attention"), ("fp16", False, CONV_AND_LINEAR)],
)
def test_exported_lora_reloads_in_diffusers_and_matches(
    tmp_path, tiny_sdxl_dir, images_dir, dtype, train_te, targets
):
    from diffusers import StableDiffusionXLPipeline

    run = _run(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        lora={"train_text_encoders": train_te, "targets": targets},
        train={"epochs": 2, "learning_rate": 1e-2},
        export={"dtype": dtype},
    )
    run.train()
    path = run.run_dir / "epoch2.safetensors"
    assert path.is_file() and (run.run_dir / "epoch1.safetensors").is_file()
    assert (run.run_dir / "test.safetensors").read_bytes() == path.read_bytes()

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).ndim for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert all(
        k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for k in unet_keys
    )
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys) == train_te
    assert alphas == {0}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["loratk.base_model"] == str(tiny_sdxl_dir) and meta["ss_epoch"] == "2"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    torch.manual_seed(0)
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    enc, pooled, time_ids = (
        torch.randn(1, 77, 80),
        torch.randn(1, 48),
        torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    )
    ids = pipe.tokenizer(["a red sun"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def unet_out(unet):
        with torch.no_grad():
            return unet(
                sample, t, enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
            ).sample

    def te_out(model):
        with torch.no_grad():
            return model.text_encoder(ids, output_hidden_states=True).hidden_states[-2], model.text_encoder_2(
                ids
            )[0]

    base_unet, base_te = unet_out(pipe.unet), te_out(pipe)
    pipe.load_lora_weights(str(path))
    loaded_unet, loaded_te = unet_out(pipe.unet), te_out(pipe)
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == "fp32" else dict(rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(loaded_unet, unet_out(run.model.unet), **tol)
    assert (loaded_unet - base_unet).abs().max() > 1e-3  # the LoRA does something
    for loaded, trained, base in zip(loaded_te, te_out(run.model), base_te, strict=True):
        torch.testing.assert_close(loaded, trained, **tol)
        assert ((loaded - base).abs().max() > 1e-4) == train_te


def test_diffusers_layout_export_keeps_its_config(tmp_path, tiny_sdxl_dir, images_dir):
    from diffusers import StableDiffusionXLPipeline

    run = _run(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"epochs": 1, "learning_rate": 1e-2},
        export={"diffusers": True, "dtype": "fp32"},
    )
    run.train()
    folder = run.run_dir / "epoch1_diffusers"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(folder))
    torch.manual_seed(0)
    sample, enc = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 80)
    cond = {"text_embeds": torch.randn(1, 48), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = pipe.unet(sample, torch.tensor([10]), enc, added_cond_kwargs=cond).sample
        b = run.model.unet(sample, torch.tensor([10]), enc, added_cond_kwargs=cond).sample
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_metrics_and_resolved_recipe_are_written(tmp_path, tiny_sdxl_dir, images_dir):

    from loratk.recipe import dump_recipe, load_recipe, recipe_diff

    run = _run(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        train={"epochs": 2},
        optim={"scheduler": "linear", "warmup_steps": 0},
    )
    run.train()
    lines = step_rows(run.run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert {"train/loss", "lr/unet", "perf/images_per_s", "epoch"} <= set(lines[0])
    assert lines[-1]["lr/unet"] < lines[0]["lr/unet"]  # the linear schedule decays
    resolved = (run.run_dir / "recipe.resolved.toml").read_text()
    assert (
        recipe_diff(resolved, run.recipe, ignore=()) == []
        and dump_recipe(load_recipe(run.run_dir / "recipe.resolved.toml")) == resolved
    )


@pytest.mark.parametrize("targets, modules", [("all-linear", 722), ("attention", 560)])
def test_full_size_lora_sizes_in_readme_are_counted(targets, modules):
    """README's size table, checked on the full-size SDXL 1.0 UNet built on the meta device."""
    import re

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from loratk.adapters.lora_layers import count_lora_parameters
    from loratk.models.base_configs import SDXL_BASE_UNET_CONFIG

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    column = 1 if targets == "all-linear" else 2
    rows = {int(m[1]): m[0].split("|")[column + 1] for m in re.finditer(r"^\| (\d+) \|.*\|$", readme, re.M)}
    assert set(rows) >= {8, 16, 32, 64, 128} and f"`{targets}` ({modules} modules)" in readme
    for rank in (8, 16, 32, 64, 128):
        count, params = count_lora_parameters(unet, targets, rank)
        assert count == modules
        weights, size = re.fullmatch(r" ([\d.]+) M weights, (\d+) MB ", rows[rank]).groups()
        assert float(weights) == round(params / 1e6, 1) and int(size) == round(2 * params / 1e6)
    assert count_lora_parameters(unet, "all-linear", 128)[1] == 340_459_520  # 681,230,116 bytes measured
