"""Text-encoder LoRA without the PEFT version gates of transformers' integration layer.

transformers 5.24 refuses every PEFT below 0.22 in `add_adapter` / `load_adapter`, and no such PEFT exists
yet. loratk injects and loads text-encoder LoRA through PEFT itself, so training and `loratk sample` work
whatever minimum transformers asks for. The fixture makes the gate refuse the installed PEFT on any version.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_recipe
from loratk.adapters.lora import LoraAdapter
from loratk.models.sdxl import load_sdxl
from loratk.prompts import PromptSpec
from loratk.run import TrainingRun
from loratk.sampling.command import run_sample


@pytest.fixture
def peft_gate_refuses(monkeypatch):
    """transformers' PEFT integration refuses the installed PEFT, as 5.24 does with PEFT 0.21."""
    import transformers.integrations.peft as integration

    def refuse(min_version: str) -> None:
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 99.0")

    monkeypatch.setattr(integration, "check_peft_version", refuse)
    encoder = load_sdxl("builtin:tiny-sdxl").text_encoder
    from peft import LoraConfig

    with pytest.raises(ValueError, match="not compatible"):  # the gate is really shut
        encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))


def _lora_modules(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def test_text_encoder_lora_is_injected_past_the_gate(peft_gate_refuses):
    model = load_sdxl("builtin:tiny-sdxl")
    LoraAdapter(rank=4, alpha=2, train_text_encoders=True).apply(model)
    # Tiny CLIP has 2 layers: CLIP-L trains layer 0 (SDXL reads its penultimate output), CLIP-G both; 4 each.
    assert (_lora_modules(model.text_encoder), _lora_modules(model.text_encoder_2)) == (4, 8)
    assert model.text_encoder.peft_config["default"].r == 4  # what the diffusers-layout export reads
    assert all(p.dtype == torch.float32 for n, p in model.text_encoder.named_parameters() if p.requires_grad)


def test_training_and_sampling_with_text_encoder_lora_past_the_gate(
    peft_gate_refuses, tmp_path, tiny_sdxl_dir, images_dir
):
    prompt = "a red sun over the sea"
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        lora={"rank": 4, "alpha": 2, "train_text_encoders": True},
        train={"epochs": 1, "learning_rate": 1e-2, "gradient_checkpointing": True},
        export={"dtype": "fp32", "diffusers": True},
        sample={"prompts": [prompt], "seeds": [1], "steps": 2, "size": 64, "at_start": False},
    )
    run = TrainingRun(recipe)
    run.setup()
    before = {n: p.detach().clone() for n, p in run.model.text_encoder.named_parameters() if p.requires_grad}
    try:
        run.train()
    finally:
        run.cleanup()
    after = dict(run.model.text_encoder.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # gradients reached the CLIP LoRA
    live = np.asarray(Image.open(run.run_dir / "samples/epoch001/01-seed1.png"), dtype=np.int16)
    for lora in ("epoch1.safetensors", "epoch1_diffusers"):  # kohya layout, and diffusers' with its config
        result = run_sample(
            prompts=[PromptSpec(prompt)],
            loras=[run.run_dir / lora],
            model=str(tiny_sdxl_dir),  # the diffusers layout has no loratk metadata
            seeds=[1],
            steps=2,
            size=(64, 64),
            out_dir=tmp_path / lora,
            progress=False,
        )
        rendered = np.asarray(Image.open(result.images[0]), dtype=np.int16)
        assert np.abs(rendered - live).max() <= 1, lora  # the file renders what training rendered
