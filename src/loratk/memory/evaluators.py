"""Peak memory of the image metrics' feature models (CLIP, DINO, DINOv2, Inception), on fake tensors.

During training the evaluation hook loads one evaluator at a time on the card, in the run's half precision
(Inception in fp32), beside the run's state (weights, trainable weights, optimizer state), runs batches of
`eval.batch_size` images through it and frees it before the next. So each evaluator's estimate is the run's
resident memory + the evaluator's weights + one forward pass at that batch, with no grad.

Only configs are read: those of the default evaluators ship with loratk; a local folder's or a cached hub
model's are read from its `config.json` and `preprocessor_config.json`; the builtin tiny ones are built as
they are for a run. torch-fidelity's Inception is built only together with its weights, so it is not
estimated (it is the smallest of the four: about 24 M parameters in fp32).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loratk.evaluation.defaults import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_DINOV2, IMAGE_METRICS
from loratk.memory.tracker import PeakBreakdown

if TYPE_CHECKING:
    from loratk.memory.estimate import _FakeRun
    from loratk.recipe import Recipe

SHIPPED = {DEFAULT_CLIP: "clip-vit-large-patch14", DEFAULT_DINO: "dino-vits16", DEFAULT_DINOV2: "dinov2-base"}
_INCEPTION_SIZE = 299


@dataclass(frozen=True)
class EvaluatorEstimate:
    kind: str  # "clip" | "dino" | "dinov2" | "inception"
    name: str  # as the recipe gives it
    batch_size: int
    dtype: torch.dtype
    peak: PeakBreakdown | None  # None: not estimated (`note` says why)
    note: str = ""
    seconds: float = 0.0


def evaluator_kinds(recipe: Recipe) -> list[str]:
    """The evaluators the run loads during training (none when it computes no image metric then)."""
    from loratk.evaluation.defaults import EVALUATOR_KINDS

    cfg = recipe.eval
    renders = recipe.sample.enabled or bool(cfg.prompts)
    if not cfg.scores_while_training or not renders:
        return []
    wanted = {IMAGE_METRICS[name] for name in cfg.metrics}
    return [kind for kind in EVALUATOR_KINDS if kind in wanted and cfg.evaluator(kind)]


def evaluator_config(kind: str, name: str, cache_dir: Any = None) -> tuple[dict[str, Any], int]:
    """(config, input side in pixels) of an evaluator; ValueError with the reason when it is not known."""
    if name in SHIPPED:
        folder = resources.files("loratk.memory") / "configs" / "evaluators"
        shipped = json.loads((folder / f"{SHIPPED[name]}.json").read_text())
        return shipped["config"], shipped["input_size"]
    if kind == "inception" and (name == "torch-fidelity" or name.endswith((".pth", ".pt"))):
        raise ValueError(
            "torch-fidelity builds its Inception only together with its weights (about 24 M "
            "parameters in fp32, the smallest of the evaluators)"
        )
    from loratk.evaluation.evaluators import EvaluatorError, resolve_source

    try:
        where = Path(resolve_source(kind, name, cache_dir))
    except EvaluatorError as err:
        raise ValueError(str(err)) from err
    if not where.is_dir():
        where = _cached_hub_folder(str(where))
    config = json.loads((where / "config.json").read_text())
    if kind == "inception":
        return config, _INCEPTION_SIZE
    return config, _input_size(where, config)


def _cached_hub_folder(repo: str) -> Path:
    """The folder of a hub model's config in the Hugging Face cache (fetching the config alone if online)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo, "config.json")
        with contextlib.suppress(Exception):  # without it, the config's image size stands in
            hf_hub_download(repo, "preprocessor_config.json")
    except Exception as err:  # noqa: BLE001 - offline and not cached, unknown repo
        raise ValueError(f"its config is not in the Hugging Face cache ({type(err).__name__})") from err
    return Path(config).parent


def _input_size(folder: Path, config: dict[str, Any]) -> int:
    """The side the processor gives the model: its crop size, else its size, else the config's image size."""
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        value = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
        if isinstance(value, dict):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            return value
    vision = config.get("vision_config", config)
    return int(vision.get("image_size", 224))


def _build(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """The evaluator's network from its config, on the meta device."""
    with torch.device("meta"):
        if kind == "inception":
            from loratk.evaluation.tiny import TinyInception

            return TinyInception(**config)
        from transformers import AutoConfig

        options = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
        built = AutoConfig.for_model(config["model_type"], **options)
        if built.model_type == "clip":
            from transformers import CLIPModel

            return CLIPModel(built)
        if built.model_type == "vit":
            from transformers import ViTModel

            return ViTModel(built, add_pooling_layer=False)
        from transformers import Dinov2Model

        return Dinov2Model(built)


@dataclass
class MetaEvaluator:
    """An evaluator's network on the meta device (built outside the fake-tensor mode), or why there is none."""

    kind: str
    name: str
    model: torch.nn.Module | None
    side: int = 0  # input side in pixels
    note: str = ""


def build_meta_evaluators(recipe: Recipe) -> list[MetaEvaluator]:
    """The networks of the evaluators the run loads during training, from their configs alone."""
    built = []
    for kind in evaluator_kinds(recipe):
        name = recipe.eval.evaluator(kind)
        try:
            config, side = evaluator_config(kind, name, recipe.data.cache_dir)
        except (ValueError, OSError) as err:
            built.append(MetaEvaluator(kind, name, None, note=str(err)))
            continue
        built.append(MetaEvaluator(kind, name, _build(kind, config).eval().requires_grad_(False), side))
    return built


def run_evaluator(run: _FakeRun, evaluator: MetaEvaluator, batch_size: int) -> EvaluatorEstimate:
    """One evaluator's peak on top of what the run holds now: its weights and one batch through it."""
    from loratk.memory.bases import materialised

    kind, model, side = evaluator.kind, evaluator.model, evaluator.side
    from loratk.evaluation.evaluators import evaluator_dtype

    dtype = torch.float32 if kind == "inception" else evaluator_dtype(run.device_type, run.weight_dtype)
    if model is None:
        return EvaluatorEstimate(kind, evaluator.name, batch_size, dtype, None, evaluator.note)
    start = time.perf_counter()
    tracker = run.tracker
    tracker.reset_peak()
    tracker.phase = "evaluation"
    real = run.extras.get("real", False)
    with materialised([model], tracker, real=real, dtype=dtype):  # freed before the next one loads
        tracker.name_modules({kind: model})
        with torch.no_grad():
            if kind == "inception":
                out = model(torch.zeros(batch_size, 3, side, side, dtype=torch.uint8))
            else:
                pixels = torch.randn(batch_size, 3, side, side, dtype=dtype)
                out = (
                    model.get_image_features(pixel_values=pixels)
                    if kind == "clip"
                    else model(pixel_values=pixels)
                )
            del out
        peak = tracker.breakdown()
    return EvaluatorEstimate(
        kind, evaluator.name, batch_size, dtype, peak, seconds=time.perf_counter() - start
    )
