"""The feature models behind the evaluation numbers: CLIP (CLIP-I, CLIP-T), DINO / DINOv2 (identity, FD and KID
in DINOv2 space) and Inception (FID, KID, IS), loaded from a hub id, a local folder or a `builtin:` tiny model.

An evaluator turns PIL images into float32 CPU features, in batches, under `torch.no_grad`. Its `digest`
names the model and the preprocessing, so the feature cache knows when its stored features still hold.
"""

from __future__ import annotations

import abc
import gc
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from loratk.evaluation.defaults import DEFAULT_CLIP, DEFAULT_DINO
from loratk.evaluation.defaults import EVALUATOR_KINDS as KINDS
from loratk.evaluation.tiny import BUILTIN_EVALUATORS, materialise_tiny_evaluator

# How the Inception evaluator resizes (evaluation.inception). Resizing alone moves FID by several points
# (clean-fid), so record this beside every FID / KID / IS: numbers from another resize do not compare.
INCEPTION_RESIZE = "PIL bicubic 299x299"
# Bump when the way images become model input changes (resizing, colour conversion), so that cached
# features computed the old way are recomputed.
PREPROCESSING_VERSION = "1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_MODEL_TYPES = {"clip": ("clip",), "dino": ("vit", "dinov2"), "dinov2": ("vit", "dinov2")}


def evaluator_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """What the evaluators run in: on a GPU the training's half precision (fp16 when it trains in fp32),
    else fp32. (Inception always runs in fp32: `inception.load_inception`.)"""
    if device_type != "cuda":
        return torch.float32
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.float16


class EvaluatorError(RuntimeError):
    """A feature model cannot be loaded or used; the message names it and says how to get it."""


class Evaluator(abc.ABC):
    """A loaded feature model: `kind` ("clip", "dino", "dinov2", "inception"), `name` (as given),
    `digest` (model + preprocessing, the feature cache's key), `feature_dim`, `batch_size`.

    Use it as a context manager, or call `close()`, to free the model (and the GPU memory it held).
    """

    def __init__(
        self,
        kind: str,
        name: str,
        model: torch.nn.Module,
        *,
        digest: str,
        feature_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ):
        self.kind, self.name, self.digest, self.feature_dim = kind, name, digest, feature_dim
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model: torch.nn.Module | None = model.to(device).eval()

    def image_features(self, images: Sequence[Image.Image]) -> Tensor:
        """float32 [N, feature_dim] on the CPU, row i for `images[i]`, `batch_size` images per forward."""
        return self._batched(images, lambda batch: (self._encode_images(batch),), (self.feature_dim,))[0]

    @abc.abstractmethod
    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        """One batch of images to features [len(images), feature_dim]; each model kind says how."""

    def _batched(
        self, items: Sequence, encode: Callable[[list], tuple[Tensor, ...]], widths: tuple[int, ...]
    ) -> tuple[Tensor, ...]:
        """Run `encode` on `batch_size` items at a time and concatenate each of its outputs (float32, CPU);
        `widths` are the outputs' widths, for the empty result of no items."""
        if self.model is None:
            raise EvaluatorError(f"eval.{self.kind}: {self.name!r} was closed; load it again")
        if not items:
            return tuple(torch.empty(0, width) for width in widths)
        parts: list[list[Tensor]] = [[] for _ in widths]
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                for part, out in zip(
                    parts, encode(list(items[start : start + self.batch_size])), strict=True
                ):
                    part.append(out.float().cpu())
        return tuple(torch.cat(part) for part in parts)

    def close(self) -> None:
        """Drop the model and give its memory back."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pooled(out: Any) -> Tensor:
    """`get_image_features` / `get_text_features` return a tensor in transformers 4 and an output object
    whose `pooler_output` holds the projected embedding in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipEvaluator(Evaluator):
    """CLIP image embeddings (CLIP-I) and text embeddings (CLIP-T), in one projected space."""

    def __init__(self, *args: Any, processor: Any, tokenizer: Any, max_length: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.processor, self.tokenizer, self.max_length = processor, tokenizer, max_length

    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = pixels["pixel_values"].to(self.device, self.dtype)  # [B, 3, S, S]
        return _pooled(self.model.get_image_features(pixel_values=pixels))  # [B, D]

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """float32 [N, feature_dim] on the CPU; prompts over CLIP's 77 tokens are truncated, as in SDXL."""

        def encode(batch: list[str]) -> tuple[Tensor]:
            tokens = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            return (_pooled(out),)

        return self._batched(prompts, encode, (self.feature_dim,))[0]


class DinoEvaluator(Evaluator):
    """DINO v1 (`ViTModel`: the class token of the last layer; its pooler is untrained) or DINOv2
    (`Dinov2Model`: `pooler_output`, the layer-normed class token)."""

    def __init__(self, *args: Any, processor: Any, model_type: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.processor, self.model_type = processor, model_type

    def _encode_images(self, images: list[Image.Image]) -> Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
        if self.model_type == "vit":
            return out.last_hidden_state[:, 0]  # [B, D]
        return out.pooler_output  # [B, D]


def compute_digest(parts: dict[str, Any]) -> str:
    """sha256 of the JSON of `parts` (sorted keys): the same model and preprocessing give the same digest."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def list_weight_files(folder: Path | None) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the weight files in `folder`: a fingerprint of the weights that needs no
    hashing of gigabytes, and that changes when a file is replaced in place."""
    if folder is None or not folder.is_dir():
        return []
    files = [(p.name, p.stat()) for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)]
    return sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in files)


def _model_folder(where: str) -> Path | None:
    """The local folder a model was loaded from: the folder itself, or its snapshot in the hub cache."""
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(where, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")


def _cannot_load(kind: str, name: str, err: BaseException) -> EvaluatorError:
    if Path(name).expanduser().is_dir():
        return EvaluatorError(f"eval.{kind}: cannot load the folder {name!r}: {err}")
    if _hub_offline():
        how = (
            "not in the Hugging Face cache and the hub is offline; download it once with "
            f"`hf download {name}` (or `huggingface-cli download {name}`), or set eval.{kind} to a local folder"
        )
    else:
        how = f"{err}; check the hub id, or set eval.{kind} to a local folder"
    return EvaluatorError(f"eval.{kind}: cannot load {name!r}: {how}")


def resolve_source(kind: str, name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Where to load `name` from: a builtin's cache folder (built once), a local folder, or the hub id."""
    if not name:
        raise EvaluatorError(f'eval.{kind} is "": that metric is switched off, there is nothing to load')
    if name.startswith("builtin:"):
        if name not in BUILTIN_EVALUATORS:
            raise EvaluatorError(
                f"eval.{kind}: unknown built-in {name!r}; built-in evaluators: {', '.join(BUILTIN_EVALUATORS)}"
            )
        return str(materialise_tiny_evaluator(name, cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or path.suffix in _WEIGHT_SUFFIXES:
        raise EvaluatorError(f"eval.{kind}: {name!r}: no such folder; give a model folder or a hub id")
    return name


def _pil_backend() -> dict[str, Any]:
    """Ask for the PIL image processor: transformers 5 picks the torchvision one when torchvision is there,
    and its resizing gives other numbers (and other cache keys) than PIL's."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


def _config_digest(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(volatile, None)
    return data


def _load_transformers(kind: str, name: str, where: str, options: dict[str, Any]) -> Evaluator:
    from transformers import AutoConfig, AutoImageProcessor

    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise _cannot_load(kind, name, err) from err
    if config.model_type not in _MODEL_TYPES[kind]:
        wanted = " or ".join(_MODEL_TYPES[kind])
        raise EvaluatorError(
            f"eval.{kind}: {name!r} is a {config.model_type!r} model; expected {wanted} "
            f"(e.g. {DEFAULT_CLIP if kind == 'clip' else DEFAULT_DINO})"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(where, **_pil_backend())
        if kind == "clip":
            from transformers import AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(where, dtype=options["dtype"])
            tokenizer = AutoTokenizer.from_pretrained(where)
        elif config.model_type == "vit":
            from transformers import ViTModel

            model = ViTModel.from_pretrained(where, dtype=options["dtype"], add_pooling_layer=False)
        else:
            from transformers import Dinov2Model

            model = Dinov2Model.from_pretrained(where, dtype=options["dtype"])
    except (OSError, ValueError) as err:
        raise _cannot_load(kind, name, err) from err
    folder = _model_folder(where)
    digest = compute_digest(
        {
            "kind": kind,
            "name": name,
            "revision": folder.name if folder is not None and not Path(where).is_dir() else None,
            "config": _config_digest(config),
            "weights": list_weight_files(folder),
            "processor": [type(processor).__name__, processor.to_dict()],
            "dtype": str(options["dtype"]),
            "preprocessing": PREPROCESSING_VERSION,
        }
    )
    if kind == "clip":
        return ClipEvaluator(
            kind,
            name,
            model,
            digest=digest,
            feature_dim=config.projection_dim,
            processor=processor,
            tokenizer=tokenizer,
            max_length=config.text_config.max_position_embeddings,
            **options,
        )
    return DinoEvaluator(
        kind,
        name,
        model,
        digest=digest,
        feature_dim=config.hidden_size,
        processor=processor,
        model_type=config.model_type,
        **options,
    )


def load_evaluator(
    kind: str,
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
) -> Evaluator:
    """Load the feature model of `kind` ("clip", "dino", "dinov2" or "inception") named `name`.

    `name` is a hub id, a local folder or a builtin (`builtin:tiny-clip`, `builtin:tiny-dino`,
    `builtin:tiny-dinov2`, `builtin:tiny-inception`); for Inception also "torch-fidelity" or a local
    torch-fidelity weights file (see `evaluation.inception`). DINO and DINOv2 are told apart by the folder's
    config (`vit` or `dinov2`). `cache_dir` is where builtins are built (default: the loratk cache); hub
    models come from the Hugging Face cache. `dtype` applies to the transformers models; Inception runs in
    float32. Raises `EvaluatorError` saying how to get a model that is missing.
    """
    if kind not in KINDS:
        raise EvaluatorError(f"unknown evaluator kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if batch_size < 1:
        raise EvaluatorError(f"eval.{kind}: batch_size must be at least 1, got {batch_size}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise EvaluatorError(f"eval.{kind}: device {device!r}: {err}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluatorError(f"eval.{kind}: device {str(device)!r}: no CUDA GPU is available here; use cpu")
    options = {"device": device, "dtype": dtype, "batch_size": batch_size}
    if kind == "inception":
        from loratk.evaluation.inception import load_inception

        return load_inception(name, cache_dir=cache_dir, **options)
    return _load_transformers(kind, name, resolve_source(kind, name, cache_dir), options)
