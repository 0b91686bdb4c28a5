"""LoRA files as users hand them to `loratk sample`: read and checked (safetensors only, finite), and
loaded into a pipeline completely or refused, with the file named."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratk.adapters.lora_layers import load_text_encoder_lora


class LoraFileError(ValueError):
    """A LoRA file that cannot be used (missing, damaged, not finite, not for this model); names the file."""


DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes into a folder
_DOWN_KEY = re.compile(
    r"^(.+?)\.(?:lora_down|lora_A|lora\.down|lora_linear_layer\.down)(?:\.[^.]+)?\.weight$"
)


def lora_modules(keys: Sequence[str]) -> set[str]:
    """The modules a LoRA state dict adapts (kohya `lora_down`, PEFT `lora_A` or older diffusers keys)."""
    return {m[1] for k in keys if (m := _DOWN_KEY.match(k))}


@dataclass
class LoraFile:
    path: Path
    metadata: dict[str, str]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    @property
    def name(self) -> str:
        """The file stem (`epoch7`), or the folder's name for a diffusers-layout export (`epoch7_diffusers`)."""
        return self.path.parent.name if self.path.name == DIFFUSERS_LORA_FILE else self.path.stem

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("loratk.base_model") or self.metadata.get("ss_sd_model_name") or None

    @property
    def epoch(self) -> int | None:
        value = self.metadata.get("loratk.epoch") or self.metadata.get("ss_epoch")
        return int(value) if value and value.isdigit() else None

    @property
    def resolution(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"(\d+)x(\d+)", self.metadata.get("modelspec.resolution", ""))
        return (int(m[1]), int(m[2])) if m else None

    def run_sample_settings(self) -> dict[str, Any] | None:
        """The `[sample]` section of the run that wrote this file (loratk files carry their recipe)."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib

        text = self.metadata.get("loratk.recipe")
        if not text:
            return None
        try:
            return tomllib.loads(text).get("sample") or None
        except tomllib.TOMLDecodeError:
            return None


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA safetensors file (or a diffusers-layout folder), with errors that name the file.

    Only safetensors are read: pickle files (.ckpt/.pt/.bin) can run code when loaded.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_LORA_FILE).is_file():
        path = path / DIFFUSERS_LORA_FILE
    if not path.exists():
        raise LoraFileError(f"{path}: LoRA file not found")
    if path.is_dir():
        raise LoraFileError(f"{path}: is a folder, not a LoRA file; pass the .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{path}: not a .safetensors file; only safetensors LoRAs are loaded (pickle files such as "
            ".ckpt, .pt or .bin can run code). Convert it to safetensors first"
        )
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoraFileError(
            f"{path}: cannot read it as safetensors ({err}); the file is damaged, truncated or not safetensors"
        ) from None
    if not lora_modules(list(tensors)):
        raise LoraFileError(
            f"{path}: holds no LoRA weights (no lora_down / lora_A keys among {len(tensors)} tensors); "
            "a full checkpoint goes in --model"
        )
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise LoraFileError(
            f"{path}: tensor {broken[0]}{more} holds NaN/inf values: the adapter is broken (did its training "
            "diverge? check train/loss in metrics.jsonl) and would render black images; use an earlier epoch"
        )
    return LoraFile(path, metadata, tensors)


def text_encoder_names(pipe: Any) -> list[str]:
    """The pipeline's text encoders by component name (`text_encoder`, ...)."""
    return [n for n, c in pipe.components.items() if n.startswith("text_encoder") and c is not None]


def _injected_modules(pipe: Any, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1
        for part in (pipe.unet, *(getattr(pipe, n) for n in text_encoder_names(pipe)))
        for m in part.modules()
        if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
    )


def _first_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    return mismatch or (lines[0] if lines else type(err).__name__)


def load_lora_into_pipeline(pipe: Any, lora: LoraFile, adapter: str) -> None:
    """What `pipe.load_lora_weights` does, with the text encoders' part loaded through PEFT directly.

    diffusers converts the file (kohya or diffusers layout) and loads the UNet's part itself; its
    text-encoder path goes through transformers' `load_adapter`, which refuses PEFT releases older than its
    own minimum (transformers 5.24 asks for a PEFT that does not exist yet).
    """
    state_dict, alphas = pipe.lora_state_dict(dict(lora.state_dict), unet_config=pipe.unet.config)
    # A diffusers-layout file keeps each part's LoRA config (rank, alpha) in its metadata.
    raw = lora.metadata.get("lora_adapter_metadata")
    config = json.loads(raw) if raw else {}

    def part(prefix: str) -> dict[str, Any] | None:
        found = {k[len(prefix) + 1 :]: v for k, v in config.items() if k.startswith(prefix + ".")}
        return found or None

    if any(k.startswith("unet.") for k in state_dict):
        pipe.load_lora_into_unet(
            state_dict,
            network_alphas=alphas,
            unet=pipe.unet,
            adapter_name=adapter,
            metadata=config or None,  # diffusers takes its `unet.` share itself
            _pipeline=pipe,
        )
    for name in text_encoder_names(pipe):
        load_text_encoder_lora(
            getattr(pipe, name),
            state_dict,
            prefix=name,
            adapter_name=adapter,
            network_alphas=alphas,
            config=part(name),
        )


def apply_lora(pipe: Any, lora: LoraFile, adapter: str, model_name: str) -> None:
    """Load `lora` into the pipeline as `adapter`; refuse one whose modules don't all fit the base model.

    The file's own modules are counted against what was injected: loaders skip unknown keys silently
    (the "LoRA has no effect" complaint, shared/REFERENCE.md §3).
    """
    expected = len(lora_modules(list(lora.state_dict)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # expected: >1 LoRA
            load_lora_into_pipeline(pipe, lora, adapter)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many types for a foreign file
        raise LoraFileError(
            f"{lora.path}: does not fit the base model {model_name}: 0 of {expected} LoRA modules could be "
            f"applied ({type(err).__name__}: {_first_reason(err)}). Is it a LoRA for another model?"
        ) from None
    matched = _injected_modules(pipe, adapter)
    if matched < expected:
        raise LoraFileError(
            f"{lora.path}: does not fit the base model {model_name}: only {matched} of {expected} LoRA "
            "modules matched; is it a LoRA for another model (another family, another variant)?"
        )
