from __future__ import annotations

import json

import pytest
import torch

from loratk.export.formats import (
    build_training_metadata,
    compute_tag_frequency,
    diffusers_to_sgm_unet_name,
    peft_to_kohya,
    text_encoder_kohya_name,
)
from loratk.models.sdxl import SDXL


@pytest.mark.parametrize(
    "diffusers_name, sgm",
    [
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        ),
        ("mid_block.resnets.0.conv2", "middle_block.0.out_layers.3"),
        ("mid_block.resnets.1.conv1", "middle_block.2.in_layers.2"),
        ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
        ("up_blocks.0.attentions.1.proj_out", "output_blocks.1.1.proj_out"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        (
            "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0",
            "output_blocks.5.1.transformer_blocks.1.attn1.to_out.0",
        ),
        ("up_blocks.2.resnets.0.conv2", "output_blocks.6.0.out_layers.3"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ],
)
def test_sdxl_unet_names_map_to_sgm(diffusers_name, sgm):
    assert diffusers_to_sgm_unet_name(diffusers_name) == sgm


def test_unknown_unet_module_is_refused():
    with pytest.raises(ValueError, match="no SGM name"):
        diffusers_to_sgm_unet_name("encoder_hid_proj")


def test_text_encoder_names_get_text_model_root():
    assert (
        text_encoder_kohya_name("encoder.layers.0.self_attn.q_proj")
        == "text_model.encoder.layers.0.self_attn.q_proj"
    )
    assert (
        text_encoder_kohya_name("text_model.encoder.layers.0.mlp.fc1")
        == "text_model.encoder.layers.0.mlp.fc1"
    )


def test_peft_to_kohya_keys_shapes_and_alpha():
    down, up = torch.randn(4, 32), torch.randn(64, 4)
    out = peft_to_kohya(
        {
            "unet": {
                "down_blocks.1.attentions.0.proj_in.lora_A.weight": down,
                "down_blocks.1.attentions.0.proj_in.lora_B.weight": up,
            },
            "text_encoder": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": down},
            "text_encoder_2": {"text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight": up},
        },
        alpha=2.0,
        family=SDXL,
        dtype=torch.float32,
    )
    base = "lora_unet_input_blocks_4_1_proj_in"
    assert torch.equal(out[f"{base}.lora_down.weight"], down)
    assert torch.equal(out[f"{base}.lora_up.weight"], up)
    assert out[f"{base}.alpha"].ndim == 0 and out[f"{base}.alpha"].item() == 2.0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in out
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in out


def test_peft_to_kohya_casts_and_refuses_foreign_keys():
    out = peft_to_kohya(
        {"unet": {"conv_in.lora_A.weight": torch.randn(2, 4, 3, 3)}},
        alpha=1,
        family=SDXL,
        dtype=torch.float16,
    )
    assert out["lora_unet_input_blocks_0_0.lora_down.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
        peft_to_kohya({"unet": {"conv_in.weight": torch.zeros(1)}}, alpha=1, family=SDXL)


def test_metadata_is_all_strings_with_the_keys_loaders_read():
    from loratk.adapters.lora import LoraAdapter

    facts = build_training_metadata(
        name="ukiyoe",
        resolution=(600, 400),
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        learning_rate=1e-3,
        optimizer="adafactor",
        epoch=7,
        steps=70,
        num_train_images=10,
        tag_frequency={"imgs": {"a": 2}},
        seed=1,
        recipe_toml='name = "ukiyoe"\n',
        loratk_version="0.1.0",
        method="lora",
    )
    # What a LoRA file holds: the run's facts, its family's keys, the adapter's network keys.
    meta = {**facts, **SDXL.lora_metadata(), **LoraAdapter(rank=128, alpha=128).export_metadata()}
    assert all(isinstance(v, str) for v in meta.values())
    assert not any(k.startswith("ss_network") or k == "ss_base_model_version" for k in facts)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "600x400"
    assert json.loads(meta["ss_tag_frequency"]) == {"imgs": {"a": 2}}
    assert meta["ss_network_dim"] == "128" and meta["ss_v2"] == "False"
    assert "sshs_model_hash" not in meta and "lora_adapter_metadata" not in meta


def test_tag_frequency_counts_comma_separated_tags():
    tags = compute_tag_frequency({"imgs": ["a cat, red", "a cat,  blue", ""]})
    assert tags == {"imgs": {"a cat": 2, "red": 1, "blue": 1}}
