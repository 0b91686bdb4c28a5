"""Deterministic tiny random evaluators (CLIP, DINO, DINOv2, Inception), built offline from small configs.

Like `builtin:tiny-sdxl`, each is saved once with `save_pretrained` into the loratk cache and loaded back
through `from_pretrained`, the path a hub id takes. Their numbers mean nothing; their shapes, types and
plumbing are those of the real models, at a few milliseconds per image on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from loratk.models.tiny import build_tiny_tokenizer, materialise_folder

TINY_CLIP_ID = "builtin:tiny-clip"
TINY_DINO_ID = "builtin:tiny-dino"
TINY_DINOV2_ID = "builtin:tiny-dinov2"
TINY_INCEPTION_ID = "builtin:tiny-inception"
_TINY_EVAL_VERSION = "1"  # bump when a config below changes, so stale cache folders are rebuilt

_IMAGE_SIZE = 32  # the processors resize every image to 32 x 32; patch 8 gives 16 patches + CLS
_TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=_IMAGE_SIZE, patch_size=8
)
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # as facebook/dino*'s processors


class TinyInception(nn.Module, PyTorchModelHubMixin, library_name="loratk", tags=["loratk-tiny-inception"]):
    """A three-layer conv net with the input and output contract of torch-fidelity's Inception v3.

    Input: uint8 images [N, 3, 299, 299] (0..255), as the Inception evaluator prepares them. Output:
    `(features [N, num_features], logits [N, num_classes])`, in the roles of Inception's 2048-d pool features
    and its 1008 unbiased logits. `save_pretrained` / `from_pretrained` come from `PyTorchModelHubMixin`
    (config.json + model.safetensors).
    """

    def __init__(self, num_features: int = 32, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=4, padding=2),  # [N, w, 75, 75]
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # [N, 2w, 38, 38]
            nn.ReLU(),
            nn.Conv2d(2 * width, num_features, 3, stride=2, padding=1),  # [N, F, 19, 19]
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # [N, F]
        )
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, 299, 299):
            raise ValueError(
                f"TinyInception takes uint8 images [N, 3, 299, 299], got {images.dtype} {tuple(images.shape)}"
            )
        x = (images.float() - 128.0) / 128.0  # the same scaling to [-1, 1] as torch-fidelity's Inception
        features = self.body(x)
        return features, self.fc(features)


def _seeded(build: Callable[[], object], seed: int):
    """Run `build` with torch seeded, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_clip(seed: int = 0):
    """A random `CLIPModel` (32-wide towers, 16-d projection) and its `CLIPProcessor` at 32 px."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(_TINY_VIT, intermediate_size=64)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = _seeded(lambda: CLIPModel(config).eval(), seed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_dino(seed: int = 0):
    """A random DINO-v1-style `ViTModel` (no pooler: DINO's is untrained) and its processor at 32 px."""
    from transformers import ViTConfig, ViTModel
    from transformers.image_utils import PILImageResampling
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(**_TINY_VIT, intermediate_size=64)
    model = _seeded(lambda: ViTModel(config, add_pooling_layer=False).eval(), seed)
    processor = ViTImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,  # as facebook/dino-vits16
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    )
    return model, processor


def build_tiny_dinov2(seed: int = 0):
    """A random `Dinov2Model` and a `BitImageProcessor` (resize + centre crop) at 32 px."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    config = Dinov2Config(**_TINY_VIT, mlp_ratio=2)
    model = _seeded(lambda: Dinov2Model(config).eval(), seed)
    processor = BitImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    )
    return model, processor


def build_tiny_inception(seed: int = 0) -> TinyInception:
    return _seeded(lambda: TinyInception().eval(), seed)


def _saver(build: Callable[[int], object]) -> Callable[[Path], Path]:
    def save(folder: Path, seed: int = 0) -> Path:
        built = build(seed)
        for part in built if isinstance(built, tuple) else (built,):
            part.save_pretrained(folder)
        return folder

    return save


save_tiny_clip = _saver(build_tiny_clip)
save_tiny_dino = _saver(build_tiny_dino)
save_tiny_dinov2 = _saver(build_tiny_dinov2)
save_tiny_inception = _saver(build_tiny_inception)

_BUILTINS = {
    TINY_CLIP_ID: ("tiny-clip", save_tiny_clip),
    TINY_DINO_ID: ("tiny-dino", save_tiny_dino),
    TINY_DINOV2_ID: ("tiny-dinov2", save_tiny_dinov2),
    TINY_INCEPTION_ID: ("tiny-inception", save_tiny_inception),
}
BUILTIN_EVALUATORS = tuple(_BUILTINS)


def materialise_tiny_evaluator(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a builtin evaluator (`builtin:tiny-clip` ...), built once; ValueError otherwise."""
    if name not in _BUILTINS:
        raise ValueError(f"unknown built-in evaluator {name!r}; built-in evaluators: {', '.join(_BUILTINS)}")
    folder, save = _BUILTINS[name]
    return materialise_folder(f"{folder}-v{_TINY_EVAL_VERSION}", "config.json", save, cache_dir)
