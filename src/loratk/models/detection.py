"""Which family a model belongs to, from its files alone (configs and checkpoint headers, never weights).

- a diffusers folder (or `builtin:` name): `model_index.json` names the pipeline; for `StableDiffusionPipeline`
  the UNet tells SD 1.x from SD 2.x: cross-attention 768 (CLIP-L) or 1024 (OpenCLIP-H), and for other widths
  (tiny or custom models) SD 2.x's linear transformer projections;
- a hub id: the same files, from the Hugging Face cache or the hub (the best-known ids are known offline);
- a single `.safetensors` file: where its text encoder lives (`conditioner.embedders.*` SDXL,
  `cond_stage_model.model.*` SD 2.x, `cond_stage_model.transformer.*` SD 1.x), and for the variant its
  `modelspec.*` metadata or the folder `model.single_file_config` names.

`model.family = "auto"` takes what the files say; an explicit family is checked against them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratk.models.family import (
    ModelFamily,
    ModelLoadError,
    families,
    family_of,
    is_single_file,
    refuse_pickle,
    resolve_model_path,
)

AUTO = "auto"


class FamilyMismatchError(ModelLoadError):
    """An explicit `model.family` that the model's files contradict."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model's files say about it."""

    family: str  # a `families()` name: "sdxl", "sd1", "sd2"
    native_size: int  # the side it was trained at, in pixels (the UNet's sample size x the VAE's scale)
    prediction_type: str  # "epsilon" | "v_prediction"
    evidence: str  # what told us, for messages: "model_index.json: StableDiffusionXLPipeline"


# Hub ids whose family and variant never change: known without a download (and offline).
KNOWN_HUB_IDS: dict[str, ModelInfo] = {
    **{
        hub_id: ModelInfo("sdxl", 1024, "epsilon", "a known SDXL hub id")
        for hub_id in ("stabilityai/stable-diffusion-xl-base-1.0",)
    },
    **{
        hub_id: ModelInfo("sd1", 512, "epsilon", "a known SD 1.x hub id")
        for hub_id in (
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "runwayml/stable-diffusion-v1-5",
            "CompVis/stable-diffusion-v1-4",
        )
    },
    **{
        hub_id: ModelInfo("sd2", 768, "v_prediction", "a known SD 2.x 768-v hub id")
        for hub_id in ("stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2")
    },
    **{
        hub_id: ModelInfo("sd2", 512, "epsilon", "a known SD 2.x 512 hub id")
        for hub_id in ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-base")
    },
}

# sd-scripts' modelspec.architecture names -> (family, native size, prediction type).
_ARCHITECTURES = {
    "stable-diffusion-xl-v1-base": ("sdxl", 1024, "epsilon"),
    "stable-diffusion-v1": ("sd1", 512, "epsilon"),
    "stable-diffusion-v2-512": ("sd2", 512, "epsilon"),
    "stable-diffusion-v2-768-v": ("sd2", 768, "v_prediction"),
}
# A single file with no metadata and no config: diffusers' own defaults for the family (its SD 2.x default
# config is stabilityai/stable-diffusion-2-1, the 768-v model).
_SINGLE_FILE_DEFAULTS = {"sdxl": (1024, "epsilon"), "sd1": (512, "epsilon"), "sd2": (768, "v_prediction")}
_TEXT_ENCODER_PREFIXES = (  # SDXL's first: its checkpoints have no cond_stage_model keys
    ("conditioner.embedders.1.", "sdxl"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def classify_diffusers(pipeline: str | None, unet: dict[str, Any], where: str) -> tuple[str, str]:
    """(family name, evidence) from a diffusers model's pipeline class and UNet config."""
    if pipeline == "StableDiffusionXLPipeline":
        return "sdxl", f"model_index.json: {pipeline}"
    if pipeline == "StableDiffusionPipeline":
        width = unet.get("cross_attention_dim")
        if width in (768, 1024):
            family = "sd1" if width == 768 else "sd2"
            encoder = "CLIP-L" if width == 768 else "OpenCLIP-H"
            return family, f"{pipeline} with cross-attention {width} ({encoder})"
        if unet.get("use_linear_projection"):
            return (
                "sd2",
                f"{pipeline} with linear transformer projections (as SD 2.x), cross-attention {width}",
            )
        return (
            "sd1",
            f"{pipeline} with convolutional transformer projections (as SD 1.x), cross-attention {width}",
        )
    known = ", ".join(f.label for f in families().values())
    raise ModelLoadError(
        f"{where}: a {pipeline or 'model without a pipeline class'}; loratk trains {known} models"
    )


def _info_from_configs(read: Any, where: str) -> ModelInfo:
    """`read(name, required)` -> a config dict, or None when the file is absent (or, not required, unreadable)."""
    index = read("model_index.json", True)
    if index is None:
        raise ModelLoadError(
            f"{where}: no model_index.json; a diffusers model folder has one (and unet/, vae/ ...)"
        )
    unet = read("unet/config.json", True) or {}
    family, evidence = classify_diffusers(index.get("_class_name"), unet, where)
    vae = read("vae/config.json", False) or {}
    scheduler = read("scheduler/scheduler_config.json", False) or {}
    scale = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    side = int(unet["sample_size"]) * scale if isinstance(unet.get("sample_size"), int) else None
    return ModelInfo(
        family,
        side or family_of(family).default_resolution,
        scheduler.get("prediction_type", "epsilon"),
        evidence,
    )


def _read_folder(folder: Path):
    def read(name: str, required: bool) -> dict[str, Any] | None:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    return read


def _read_hub(repo: str, revision: str | None):
    from huggingface_hub import errors, hf_hub_download

    absent = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)  # not in the repo

    def read(name: str, required: bool) -> dict[str, Any] | None:
        try:
            return json.loads(Path(hf_hub_download(repo, name, revision=revision)).read_text())
        except absent:
            return None
        except (OSError, ValueError):  # offline and not cached, no network
            if required:
                raise
            return None

    return read


def _info_from_single_file(path: Path, config: str | None, revision: str | None) -> ModelInfo:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: cannot read it as safetensors ({err})") from None
    family = next(
        (name for prefix, name in _TEXT_ENCODER_PREFIXES if any(k.startswith(prefix) for k in keys)), None
    )
    if family is None:
        raise ModelLoadError(
            f"{path}: not a Stable Diffusion checkpoint loratk knows: no text-encoder keys under "
            "conditioner.embedders.* (SDXL) or cond_stage_model.* (SD 1.x / SD 2.x)"
        )
    evidence = f"single file with {next(p for p, n in _TEXT_ENCODER_PREFIXES if n == family)}* keys"
    if config:
        described = detect_model(config, revision=revision)
        if described.family != family:
            raise ModelLoadError(
                f"model.single_file_config = {config!r} describes an {family_of(described.family).label} model "
                f"({described.evidence}), but {path} is {family_of(family).label} ({evidence})"
            )
        return ModelInfo(family, described.native_size, described.prediction_type, evidence)
    architecture = _ARCHITECTURES.get(metadata.get("modelspec.architecture", ""))
    if architecture and architecture[0] == family:
        return ModelInfo(family, architecture[1], architecture[2], evidence + " and modelspec.architecture")
    side, prediction = _SINGLE_FILE_DEFAULTS[family]
    prediction = {"v": "v_prediction", "epsilon": "epsilon"}.get(
        metadata.get("modelspec.prediction_type"), prediction
    )
    return ModelInfo(family, side, prediction, evidence)


def detect_model(
    path: str, *, single_file_config: str | None = None, revision: str | None = None
) -> ModelInfo:
    """What the files of the model at `path` say; `ModelLoadError` naming the path when they cannot be read."""
    where = resolve_model_path(path) if path.startswith("builtin:") else path
    refuse_pickle(path, where)
    local = Path(where)
    if local.is_dir():
        return _info_from_configs(_read_folder(local), path)
    if is_single_file(where):
        if not local.is_file():
            raise ModelLoadError(f"model.path = {path!r}: no such checkpoint file")
        return _info_from_single_file(local, single_file_config, revision)
    if where in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[where]
    if not _HUB_ID.match(where):
        raise ModelLoadError(f"model.path = {path!r}: no such folder, and not a hub id (owner/name)")
    try:
        return _info_from_configs(_read_hub(where, revision), path)
    except (OSError, ValueError) as err:  # offline and not cached, unknown repo, no network
        raise ModelLoadError(
            f"model.path = {path!r}: cannot read its configs to tell its family ({type(err).__name__}: {err}); "
            "set model.family (and data.resolution), or download the model first"
        ) from None


def resolve_family(
    path: str,
    requested: str = AUTO,
    *,
    single_file_config: str | None = None,
    revision: str | None = None,
) -> tuple[ModelFamily, ModelInfo | None]:
    """The family to train `path` as, and what its files say (None when an explicit family could not be
    checked: a hub id that cannot be reached). Raises `ModelLoadError` when an explicit family disagrees."""
    if requested != AUTO:
        family_of(requested)  # an unknown name fails here, naming the known ones
    try:
        info = detect_model(path, single_file_config=single_file_config, revision=revision)
    except ModelLoadError:
        if requested == AUTO or not _HUB_ID.match(path) or Path(path).exists():
            raise
        return family_of(
            requested
        ), None  # an unreachable hub id: trust the explicit family; loading will tell
    if requested not in (AUTO, info.family):
        raise FamilyMismatchError(
            f"model.family = {requested!r}, but model.path = {path!r} is an {family_of(info.family).label} "
            f"model ({info.evidence}); set model.family = {info.family!r} (or 'auto', which reads it from the files)"
        )
    return family_of(info.family), info


def native_size(
    path: str, requested: str = AUTO, *, single_file_config: str | None = None, revision: str | None = None
) -> int:
    """The side (pixels) the model was trained at: where `data.resolution` defaults to."""
    family, info = resolve_family(path, requested, single_file_config=single_file_config, revision=revision)
    return info.native_size if info is not None else family.default_resolution
