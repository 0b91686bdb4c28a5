"""The SD 1.x and SD 2.x families: UNet, VAE, one text encoder (CLIP-L for SD 1.x, OpenCLIP-H for SD 2.x) and
its tokenizer; conditioning on that encoder's hidden states alone (no pooled embedding, no time ids); their
single-file layout (LDM) and their LoRA key names (kohya's: diffusers module names under `lora_unet_` and
`lora_te_`).

Conditioning matches `StableDiffusionPipeline.encode_prompt`: `text_encoder(ids)[0]`. For SD 1.x that is
CLIP-L's last hidden state (768 wide); SD 2.x conditions on OpenCLIP-H's penultimate layer (1024 wide), which
the diffusers text encoder already is: it holds 23 of OpenCLIP-H's 24 layers, the last one dropped (what the
original `FrozenOpenCLIPEmbedder(layer="penultimate")` computes: 23 blocks, then the final layer norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loratk.export.formats import text_encoder_kohya_name
from loratk.export.single_file import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    convert_clip_l_to_sgm,
    convert_open_clip_to_sgm,
    convert_unet_to_sgm,
    convert_vae_to_sgm,
)
from loratk.models.family import DiffusionModel, load_model
from loratk.models.sdxl import tokenize_prompts

# sd-scripts' `library/sai_model_spec.py` names (modelspec.architecture), and the implementation its LoRA
# files of these families give (diffusers module names) and its checkpoints give (the original layout).
ARCH_SD1 = "stable-diffusion-v1"
ARCH_SD2_512 = "stable-diffusion-v2-512"
ARCH_SD2_768_V = "stable-diffusion-v2-768-v"
IMPLEMENTATION_LORA = "diffusers"
IMPLEMENTATION_CHECKPOINT = "https://github.com/Stability-AI/generative-models"


def up_blocks_with_attention(unet_config: Any) -> set[int]:
    """Indices of the up blocks that hold attentions ({1, 2, 3} in SD 1.x/2.x)."""
    return {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}


def predicts_v(model: DiffusionModel | None) -> bool:
    return model is not None and model.noise_scheduler.config.prediction_type == "v_prediction"


class StableDiffusionFamily:
    """SD 1.x or SD 2.x (and their fine-tunes): `StableDiffusionPipeline` with one text encoder."""

    pipeline_class = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    conditioning_keys = ("prompt_embeds",)
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

    def __init__(self, *, name: str, label: str, default_resolution: int, text_prefix: str, v2: bool):
        self.name = name
        self.label = label
        self.default_resolution = default_resolution  # the base model's side; SD 2.x-v: 768 (from its UNet)
        self.text_prefix = text_prefix  # where the text encoder lives in a single-file checkpoint
        self.v2 = v2

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def component_classes(self) -> dict[str, str]:
        return {
            "unet": "diffusers.UNet2DConditionModel",
            "vae": "diffusers.AutoencoderKL",
            "text_encoder": "transformers.CLIPTextModel",
            "tokenizer": "transformers.CLIPTokenizer",
        }

    def pipeline_options(self) -> dict[str, Any]:
        # No safety checker: loratk renders samples of what is being trained, and it would download a model.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompts(
        self, model: DiffusionModel, prompts: Sequence[str], device: Any
    ) -> dict[str, torch.Tensor]:
        """[B, 77, D]: the encoder's output hidden state, as the pipeline computes it (D = 768 / 1024)."""
        encoder, tokenizer = model.text_encoder, model.tokenizer
        if not getattr(
            encoder.config, "use_attention_mask", False
        ):  # the pipeline's rule (SD's configs: off)
            return {"prompt_embeds": encoder(tokenize_prompts(tokenizer, prompts).to(device))[0]}
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        return {"prompt_embeds": encoder(tokens.input_ids.to(device), attention_mask=mask)[0]}

    def batch_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}  # no micro-conditioning: the UNet sees the noisy latents, the timestep and the text

    def zero_empty_prompts(self) -> bool:
        return False  # the pipeline encodes the empty negative prompt

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return unet(noisy.to(dtype), timesteps, conditioning["prompt_embeds"].to(dtype)).sample

    def text_encoder_lora_targets(self, name: str, encoder: Any) -> str:
        """q, k, v and out of every layer: the UNet reads the last layer's output, so all of them learn.

        All four per layer, as for SDXL: A1111 applies SD 2.x's fused OpenCLIP attention only when all are there.
        """
        layers = "|".join(str(i) for i in range(encoder.config.num_hidden_layers))
        return rf".*encoder\.layers\.({layers})\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    def kohya_unet_name(self, module: str, unet_config: Any | None = None) -> str:
        """kohya's SD 1.x/2.x UNet mirrors diffusers' module tree: the names stay as they are."""
        return module

    def kohya_text_encoder_name(self, module: str) -> str:
        return text_encoder_kohya_name(module)

    def architecture(self, model: DiffusionModel | None) -> str:
        if not self.v2:
            return ARCH_SD1
        return ARCH_SD2_768_V if predicts_v(model) else ARCH_SD2_512

    def lora_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        """A1111 lists a LoRA under SD 2.x when `ss_v2` is "True", else under SD 1.x; Forge reads
        `ss_base_model_version` (kohya's `sd_v1`, `sd_v2`, `sd_v2_v`) and `modelspec.architecture`."""
        v = predicts_v(model)
        version = ("sd_v2" if self.v2 else "sd_v1") + ("_v" if v else "")
        return {
            "ss_base_model_version": version,
            "ss_v2": str(self.v2),
            "modelspec.architecture": f"{self.architecture(model)}/lora",
            "modelspec.implementation": IMPLEMENTATION_LORA,
            "modelspec.prediction_type": "v" if v else "epsilon",
        }

    def checkpoint_metadata(self, model: DiffusionModel | None = None) -> dict[str, str]:
        return {
            **self.lora_metadata(model),
            "modelspec.architecture": self.architecture(model),
            "modelspec.implementation": IMPLEMENTATION_CHECKPOINT,
        }

    def single_file_state_dict(self, model: DiffusionModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """UNet, VAE and text encoder as one LDM-layout checkpoint (`from_single_file`, A1111, ComfyUI).

        SD 2.x: the 23 layers diffusers holds; OpenCLIP-H's last layer, its projection and logit scale are not
        there (SD 2.x never reads them; A1111 and ComfyUI load text encoders non-strictly), as in diffusers'
        own diffusers-to-original converter.
        """
        tensors = self.convert_parts(
            model.unet.state_dict(),
            model.vae.state_dict(),
            model.text_encoder.state_dict(),
            unet_config=model.unet.config,
            num_vae_up_blocks=len(model.vae.config.up_block_types),
        )
        return {k: v.detach().to("cpu", dtype=dtype).contiguous() for k, v in tensors.items()}

    def convert_parts(
        self,
        unet: dict[str, torch.Tensor],
        vae: dict[str, torch.Tensor],
        text_encoder: dict[str, torch.Tensor],
        *,
        unet_config: Any,
        num_vae_up_blocks: int,
    ) -> dict[str, torch.Tensor]:
        """The key conversion alone (any device, meta included): diffusers state dicts -> LDM keys."""
        tensors = convert_unet_to_sgm(
            unet,
            layers_per_block=unet_config.layers_per_block,
            up_blocks_with_attention=up_blocks_with_attention(unet_config),
        )
        tensors.update(convert_vae_to_sgm(vae, num_up_blocks=num_vae_up_blocks))
        convert = convert_open_clip_to_sgm if self.v2 else convert_clip_l_to_sgm
        tensors.update(convert(text_encoder, prefix=self.text_prefix))
        return tensors


SD1 = StableDiffusionFamily(
    name="sd1", label="SD 1.x", default_resolution=512, text_prefix=SD1_CLIP_PREFIX, v2=False
)
SD2 = StableDiffusionFamily(
    name="sd2", label="SD 2.x", default_resolution=768, text_prefix=SD2_OPEN_CLIP_PREFIX, v2=True
)


def load_sd(path: str, family: StableDiffusionFamily = SD1, **options: Any) -> DiffusionModel:
    """An SD 1.x/2.x model from a hub id, folder, single file or `builtin:tiny-sd15` (see `family.load_model`)."""
    return load_model(family, path, **options)
