"""Optimizers, schedules, the plan, model loading and placement."""

from __future__ import annotations

import sys

import pytest
import torch

from loratk.core.optim import build_lr_scheduler, build_optimizer
from loratk.models.family import ModelLoadError, freeze_and_cast
from loratk.models.sdxl import load_sdxl
from loratk.plan import compute_plan


def _params():
    return [{"name": "unet", "params": [torch.nn.Parameter(torch.ones(3))]}]


def test_adafactor_uses_the_fixed_learning_rate():
    opt = build_optimizer(_params(), "adafactor", lr=1e-3)
    group = opt.param_groups[0]
    assert (group["scale_parameter"], group["relative_step"], group["warmup_init"]) == (False, False, False)
    assert group["lr"] == 1e-3 and group["name"] == "unet"


def test_adamw_and_frozen_only_params():
    assert isinstance(build_optimizer(_params(), "adamw", lr=1e-4), torch.optim.AdamW)
    frozen = [{"params": [torch.nn.Parameter(torch.ones(1), requires_grad=False)]}]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, "adamw", lr=1e-4)


def test_adamw8bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'loratk\[bnb\]'"):
        build_optimizer(_params(), "adamw8bit", lr=1e-4)


@pytest.mark.parametrize(
    "name, lrs",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5]),
        ("cosine", [0.0, 0.5, 1.0, 0.5]),
    ],
)
def test_schedules(name, lrs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, warmup_steps=2, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lrs)


def test_plan_from_epochs_and_from_max_steps():
    plan = compute_plan(
        num_examples=10,
        batches_per_epoch=5,
        per_device_batch=2,
        gradient_accumulation_steps=2,
        num_processes=2,
        epochs=3,
        max_steps=None,
    )
    assert (plan.steps_per_epoch, plan.total_steps, plan.num_epochs, plan.effective_batch) == (3, 9, 3, 8)
    plan = compute_plan(
        num_examples=10,
        batches_per_epoch=5,
        per_device_batch=2,
        gradient_accumulation_steps=1,
        num_processes=1,
        epochs=3,
        max_steps=12,
    )
    assert (plan.total_steps, plan.num_epochs) == (12, 3)
    assert "effective batch 2" in plan.describe()


def test_model_loads_from_a_folder_and_the_builtin_name(tiny_sdxl_dir):
    model = load_sdxl(str(tiny_sdxl_dir))
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.noise_scheduler.config.num_train_timesteps == 1000
    builtin = load_sdxl("builtin:tiny-sdxl")
    for a, b in zip(model.unet.parameters(), builtin.unet.parameters(), strict=True):
        assert torch.equal(a, b)  # the builtin model is deterministic


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.path = .*could not load"):
        load_sdxl(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        load_sdxl(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize(
    "precision, expected, vae_expected",
    [(torch.float16, torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16)],
)
def test_frozen_weights_take_the_mixed_precision_dtype_but_the_vae_never_fp16(
    tiny_sdxl_dir, precision, expected, vae_expected
):
    model = load_sdxl(str(tiny_sdxl_dir))
    freeze_and_cast(model, torch.device("cpu"), precision)
    assert model.unet.dtype == expected and model.text_encoder.dtype == expected
    assert model.vae.dtype == vae_expected
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_model_loads_from_a_single_file_checkpoint(tiny_sdxl_dir, tmp_path):
    from loratk.files import save_safetensors_atomic
    from loratk.models.sdxl import SDXL

    base = load_sdxl(str(tiny_sdxl_dir))
    path = tmp_path / "base.safetensors"
    save_safetensors_atomic(SDXL.single_file_state_dict(base, dtype=torch.float32), path)
    model = load_sdxl(str(path), single_file_config=str(tiny_sdxl_dir))  # offline: configs from the folder
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):  # every part, with its own weights
        loaded, original = getattr(model, part).state_dict(), getattr(base, part).state_dict()
        assert loaded.keys() == original.keys(), part
        assert all(torch.equal(loaded[k], original[k]) for k in original), part
    assert model.source == str(path) and model.noise_scheduler.config.num_train_timesteps == 1000


def test_a_weight_a_loader_left_unloaded_is_an_error_that_names_it():
    from loratk.models.family import check_all_weights_loaded

    with torch.device("meta"):
        projection = torch.nn.Linear(4, 4, bias=False)
    parts = {
        "unet": torch.nn.Linear(2, 2),
        "text_encoder_2": torch.nn.ModuleDict({"text_projection": projection}),
    }
    with pytest.raises(
        ModelLoadError, match=r"1 weight\(s\) were not loaded: text_encoder_2.text_projection.weight"
    ):
        check_all_weights_loaded(parts, "ckpt.safetensors")
    check_all_weights_loaded({"unet": torch.nn.Linear(2, 2)}, "ok")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(
        ModelLoadError, match="loads only .safetensors checkpoints.*can run any code.*from_single_file"
    ):
        load_sdxl(str(path))
