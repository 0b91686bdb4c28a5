"""The model's configs, never its weights: shipped for the standard bases (so `loratk plan` works offline),
read from a diffusers folder, or fetched alone from the hub; and the model built from them on the meta device.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from loratk.memory.estimate import EstimateError
from loratk.memory.tracker import MemoryTracker

# Base models whose configs ship with loratk (so `loratk plan` needs no download for them).
KNOWN_BASES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base-1.0",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd-v1-5",
    "runwayml/stable-diffusion-v1-5": "sd-v1-5",
}
# A single-file checkpoint carries no config: its family's standard base stands in.
_FAMILY_BASES = {"sdxl": "sdxl-base-1.0", "sd1": "sd-v1-5"}


def load_model_configs(path: str, family: Any) -> dict[str, dict[str, Any]]:
    """The configs of every part of the model at `path` (part -> config dict, plus "scheduler").

    Shipped for the standard bases and the builtin tiny model; read from a diffusers folder; otherwise
    fetched from the hub (config files only, never weights)."""
    parts = [*family.component_classes()]
    names = [p for p in parts if p not in family.tokenizer_names] + ["scheduler"]
    from loratk.models.tiny_sd import TINY_SD_MODELS, materialise_tiny_sd

    if path in TINY_SD_MODELS:  # read from its folder, built once (small, random)
        path = str(materialise_tiny_sd(path))
    elif path.startswith("builtin:"):
        return _tiny_configs(path)
    shipped = KNOWN_BASES.get(path)
    if shipped is None and path.endswith((".safetensors", ".sft")):
        shipped = _FAMILY_BASES.get(getattr(family, "name", ""))
    if shipped is not None:
        folder = resources.files("loratk.memory") / "configs" / shipped
        return {n: json.loads((folder / f"{n}.json").read_text()) for n in names}
    local = Path(path)
    if local.is_dir():
        found = {}
        for name in names:
            config = local / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
            if not config.is_file():
                raise EstimateError(f"model.path = {path!r}: no {config.relative_to(local)} in the folder")
            found[name] = json.loads(config.read_text())
        return found
    return _fetch_configs(path, names)


def _fetch_configs(repo: str, names: list[str]) -> dict[str, dict[str, Any]]:
    from huggingface_hub import hf_hub_download

    found = {}
    for name in names:
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        try:
            found[name] = json.loads(Path(hf_hub_download(repo, filename, subfolder=name)).read_text())
        except Exception as err:  # offline, unknown repo, gated
            raise EstimateError(
                f"model.path = {repo!r}: could not read its {name}/{filename} ({type(err).__name__}: {err}); "
                f"the estimate needs only the configs: known offline are {', '.join(KNOWN_BASES)} and "
                "local diffusers folders"
            ) from err
    return found


def _tiny_configs(path: str) -> dict[str, dict[str, Any]]:
    from loratk.models.tiny import TINY_SDXL_ID, tiny_sdxl_configs

    if path != TINY_SDXL_ID:
        raise EstimateError(f"model.path = {path!r}: no configs known for this built-in model")
    return tiny_sdxl_configs()


class ShapeTokenizer:
    """Stands in for a tokenizer: ids of the right shape (memory does not depend on which tokens)."""

    def __init__(self, model_max_length: int = 77):
        self.model_max_length = model_max_length

    def __call__(self, texts: list[str], **_: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.zeros(len(texts), self.model_max_length, dtype=torch.long))


def build_meta_model(family: Any, configs: dict[str, dict[str, Any]], source: str) -> Any:
    """Every part of a `family` model from its configs, on the meta device (no memory, no weights)."""
    import importlib

    from diffusers import DDPMScheduler

    from loratk.models.family import DiffusionModel

    parts: dict[str, Any] = {}
    with torch.device("meta"):
        for name, qualified in family.component_classes().items():
            if name in family.tokenizer_names:
                parts[name] = ShapeTokenizer()
                continue
            library, cls_name = qualified.split(".")
            cls = getattr(importlib.import_module(library), cls_name)
            config = {k: v for k, v in configs[name].items()}
            if library == "diffusers":
                parts[name] = cls.from_config(config)
            else:
                config_class = cls.config_class
                parts[name] = cls(config_class(**config))
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    return DiffusionModel(
        family=family,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders={n: parts[n] for n in family.text_encoder_names},
        tokenizers={n: parts[n] for n in family.tokenizer_names},
        noise_scheduler=scheduler,
        source=source,
    )


def materialise_fake(
    modules: list[torch.nn.Module],
    tracker: MemoryTracker,
    *,
    real: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Give the meta parameters and buffers of `modules` fake CPU storage (inside a FakeTensorMode), or,
    with `real`, real CPU storage (random weights, zero buffers: for measuring a real step), counted by
    `tracker` as weights or trainable weights. Shared tensors stay shared. `dtype`: floating-point tensors
    get it (a model loaded in half precision)."""
    done: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in done:
                        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=cast)
                        if real:  # every page written, as loaded weights are
                            with torch.no_grad():
                                fake.normal_(0, 0.02) if fake.is_floating_point() else fake.zero_()
                        if isinstance(tensor, torch.nn.Parameter):
                            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        category = "trainable" if tensor.requires_grad else "weights"
                        tracker.track([fake], category)
                        done[id(tensor)] = fake
                    table[name] = done[id(tensor)]


@contextlib.contextmanager
def materialised(
    modules: list[torch.nn.Module],
    tracker: MemoryTracker,
    *,
    real: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[None]:
    """`materialise_fake` for the duration, then the meta tensors back: what was on the card for a while
    (the offloaded encoders while sampling, an evaluator) leaves it, and the tracker sees its storage freed."""
    saved = [
        (table, name, tensor)
        for root in modules
        for module in root.modules()
        for table in (module._parameters, module._buffers)
        for name, tensor in table.items()
    ]
    materialise_fake(modules, tracker, real=real, dtype=dtype)
    try:
        yield
    finally:
        for table, name, tensor in saved:
            table[name] = tensor
