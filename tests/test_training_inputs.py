"""What the UNet is trained on: time ids, dropped captions, min-SNR on both DreamBooth halves, per-occurrence
class noise, the LoRA init, text-encoder learning rates, and option combinations that would train silently
wrong (fused steps with accumulation, warm-up on a constant schedule)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_recipe
from loratk.core.diffusion_math import compute_min_snr_weights, compute_snr
from loratk.models.sdxl import load_sdxl
from loratk.objectives.denoising import Denoiser
from loratk.objectives.dreambooth import DreamBoothObjective
from loratk.recipe import RecipeError, validate_recipe

MINIMAL = {"name": "x", "data": {"dir": "images"}}


@pytest.fixture(scope="module")
def tiny(tiny_sdxl_dir):
    return load_sdxl(str(tiny_sdxl_dir))


def _batch(captions: list[str], sizes: list[tuple[int, int]]) -> dict:
    n = len(captions)
    return {
        "latents": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "captions": captions,
        "original_sizes": torch.tensor(sizes),
        "crop_top_lefts": torch.zeros(n, 2, dtype=torch.long),
        "target_sizes": torch.tensor([[64, 64]] * n),
        "noise_seeds": list(range(10, 10 + n)),
    }


def test_time_ids_reach_the_unet_in_fp32_under_bf16(tiny_sdxl_dir):
    model = load_sdxl(str(tiny_sdxl_dir))
    model.unet.to(torch.bfloat16)
    denoiser = Denoiser(model, device=torch.device("cpu"), weight_dtype=torch.bfloat16)
    seen = {}
    original = model.unet.forward

    def spy(*args, **kwargs):
        seen["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"]
        return original(*args, **kwargs)

    model.unet.forward = spy
    denoiser.per_sample_loss(denoiser.encode_batch(_batch(["a cat"], [(1333, 833)])))
    time_ids = seen["time_ids"]
    assert time_ids.dtype == torch.float32
    assert time_ids[0, :2].tolist() == [1333.0, 833.0]  # bf16 would have made them 1336 and 832


def test_a_dropped_caption_trains_on_zeros_as_sdxl_samples_the_unconditional(tiny):
    denoiser = Denoiser(tiny, device=torch.device("cpu"), weight_dtype=torch.float32)
    inputs = denoiser.encode_batch(_batch(["", "a cat"], [(64, 64), (64, 64)]))["conditioning"]
    assert not inputs["prompt_embeds"][0].any() and not inputs["pooled_prompt_embeds"][0].any()
    assert inputs["prompt_embeds"][1].abs().sum() > 0 and inputs["pooled_prompt_embeds"][1].abs().sum() > 0
    # The same caption encoded on its own is unchanged by the zeroing of its neighbour.
    alone = denoiser.encode_batch(_batch(["a cat"], [(64, 64)]))["conditioning"]
    torch.testing.assert_close(inputs["prompt_embeds"][1], alone["prompt_embeds"][0])


def test_min_snr_weights_the_prior_half_of_dreambooth_too(tiny):
    """README: with train.min_snr_gamma, DreamBooth weights both halves (instance and class) per timestep."""
    weighted = Denoiser(tiny, device=torch.device("cpu"), weight_dtype=torch.float32, min_snr_gamma=1.0)
    plain = Denoiser(tiny, device=torch.device("cpu"), weight_dtype=torch.float32)
    batch = {**_batch(["sks dog", "sks dog", "a dog", "a dog"], [(64, 64)] * 4), "num_instance": 2}
    out = DreamBoothObjective(weighted, prior_loss_weight=1.0).compute_loss(batch)
    inputs = plain.encode_batch(batch)
    losses = plain.per_sample_loss(inputs)  # same seeds: same noise and timesteps
    _, timesteps = plain.draw_noise(inputs["latents"], inputs["noise_seeds"])
    weights = compute_min_snr_weights(compute_snr(timesteps, plain.alphas_cumprod), 1.0, "epsilon")
    assert not torch.allclose(weights, torch.ones(4))  # the weights do change something here
    torch.testing.assert_close(out.logs["train/prior_loss"], (losses[2:] * weights[2:]).mean())
    torch.testing.assert_close(out.logs["train/instance_loss"], (losses[:2] * weights[:2]).mean())


def test_each_occurrence_of_a_class_image_draws_its_own_noise(tmp_path, images_dir):
    from loratk.data.dataset import Record
    from loratk.data.dreambooth import DreamBoothDataset, collate_dreambooth, scan_instance_folder

    records = scan_instance_folder(images_dir, "a picture of sks")
    dataset = DreamBoothDataset(records[:4], (64, 64), seed=3)
    dataset.set_class_records([Record(records[5].path, "a picture of a landscape")])  # one class image
    dataset.set_epoch(1)
    batch = collate_dreambooth([dataset[i] for i in range(4)])
    class_seeds = batch["noise_seeds"][4:]
    assert len(class_seeds) == 4 and len(set(class_seeds)) == 4
    assert set(class_seeds).isdisjoint(batch["noise_seeds"][:4])
    again = collate_dreambooth([dataset[i] for i in range(4)])
    assert again["noise_seeds"] == batch["noise_seeds"]  # still a pure function of (seed, epoch, index)


@pytest.mark.parametrize("init, check", [("kaiming", "bounded"), ("gaussian", "std")])
def test_lora_init_options(tiny_sdxl_dir, init, check):
    from loratk.adapters.lora import LoraAdapter

    model = load_sdxl(str(tiny_sdxl_dir))
    LoraAdapter(rank=8, alpha=8, init=init).apply(model)
    downs = {n: p for n, p in model.unet.named_parameters() if "lora_A" in n}
    ups = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert downs and all(not u.any() for u in ups)  # the adapter starts as a no-op either way
    if check == "bounded":  # kaiming-uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as kohya
        for weight in downs.values():
            bound = 1 / math.sqrt(weight.shape[1])
            assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound
    else:  # N(0, 1/rank), as the diffusers examples
        values = torch.cat([w.flatten() for w in downs.values()])
        assert values.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_the_default_lora_init_is_kohyas():
    assert validate_recipe(MINIMAL).lora.init == "kaiming"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**MINIMAL, "train": {"learning_rate": 1e-3}}, 1e-4),  # LoRA: a tenth of the UNet's
        ({**MINIMAL, "train": {"learning_rate": 1e-3}, "lora": {"text_encoder_lr": 3e-5}}, 3e-5),
        (
            {
                "name": "x",
                "method": "dreambooth",
                "dreambooth": {"instance_dir": "i", "instance_prompt": "p", "class_prompt": "c"},
                "train": {"learning_rate": 2e-6},
            },
            2e-6,  # full fine-tuning: the UNet's, as diffusers' DreamBooth script
        ),
    ],
)
def test_text_encoder_learning_rate_defaults(raw, expected):
    recipe = validate_recipe(raw)
    assert recipe.text_encoder_lr == pytest.approx(expected)


def test_the_adapter_gets_the_text_encoder_rate(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.components.strategies import build_adapter

    recipe = make_recipe(
        tmp_path, tiny_sdxl_dir, images_dir, lora={"train_text_encoders": True}, train={"learning_rate": 1e-3}
    )
    model = load_sdxl(str(tiny_sdxl_dir))
    adapter = build_adapter(recipe)
    adapter.apply(model)
    groups = {g["name"]: g["lr"] for g in adapter.param_groups(model, recipe.train.learning_rate)}
    assert groups == pytest.approx({"unet": 1e-3, "text_encoders": 1e-4})


def test_warmup_on_a_constant_schedule_is_refused_with_the_fix():
    with pytest.raises(RecipeError) as info:
        validate_recipe({**MINIMAL, "optim": {"scheduler": "constant", "warmup_steps": 100}})
    (problem,) = info.value.problems
    assert "warmup_steps = 100 has no effect" in problem and "constant_with_warmup" in problem
    assert validate_recipe({**MINIMAL, "optim": {"scheduler": "constant_with_warmup", "warmup_steps": 100}})


def test_fused_backward_with_a_global_batch_that_needs_accumulation_is_refused():
    from loratk.components.launch import resolve_accumulation

    base = {**MINIMAL, "optim": {"fused_backward": True}, "train": {"batch_size": 2, "global_batch_size": 4}}
    recipe = validate_recipe(base)
    with pytest.raises(RecipeError, match="optim.fused_backward: .*cannot accumulate.*batch_size = 4"):
        resolve_accumulation(recipe, 1)
    assert resolve_accumulation(recipe, 2) == 1  # two processes x 2 = 4: no accumulation, allowed


def test_the_loop_refuses_a_fused_optimizer_with_accumulation():
    from accelerate import Accelerator

    from loratk.core.loop import run_training
    from loratk.core.optim import build_optimizer
    from loratk.plan import compute_plan

    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer([{"params": list(model.parameters())}], "adamw", lr=0.1, fused_backward=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    plan = compute_plan(
        num_examples=4,
        batches_per_epoch=4,
        per_device_batch=1,
        gradient_accumulation_steps=2,
        num_processes=1,
        epochs=1,
        max_steps=None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="cannot accumulate"):
        run_training(
            accelerator,
            objective=None,
            modules=[model],
            optimizer=optimizer,
            lr_scheduler=scheduler,
            dataloader=[],
            plan=plan,
            seed=0,
        )
