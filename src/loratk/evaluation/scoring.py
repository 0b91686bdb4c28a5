"""Score one epoch's rendered images: load each evaluator once, compute its metrics, free it.

A metric that cannot be computed (too few images, a missing model, a non-finite image) becomes a note and the
others go on: evaluation never ends a training run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loratk.evaluation.defaults import EVALUATOR_KINDS, IMAGE_METRICS


@dataclass(frozen=True)
class EvalImages:
    """What one epoch (or the base model, epoch 0) is scored on."""

    generated: Sequence[tuple[Path, str]]  # (image file, the prompt it was rendered from)
    leak_pairs: Sequence[tuple[Path, Path]] = ()  # (base model's image, this epoch's): same prompt and seed


@dataclass(frozen=True)
class EvalSettings:
    """Which evaluators score, and how they run."""

    metrics: Sequence[str]
    evaluators: dict[str, str]  # kind ("clip", "dino", "dinov2", "inception") -> model; "" = skip
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 16
    cache_dir: Path | None = None  # stored features of the real images (None: the loratk cache)
    model_cache_dir: Path | None = None  # where builtin tiny evaluators are built (None: the loratk cache)


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    time_s: float = 0.0

    def row(self, epoch: int) -> dict[str, Any]:
        """The eval.jsonl row of `epoch`."""
        return {
            "epoch": epoch,
            "metrics": self.metrics,
            "counts": self.counts,
            "settings": self.settings,
            "notes": self.notes,
            "time_s": round(self.time_s, 3),
        }


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _pixels(paths: Sequence[Path]) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1]."""
    import numpy as np

    arrays = [np.asarray(_open_rgb(p), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def score_images(images: EvalImages, real: Sequence[Path], settings: EvalSettings) -> EvalResult:
    """Every metric of `settings.metrics` that can be computed on `images` against the `real` images."""
    from loratk.evaluation import metrics as m
    from loratk.evaluation.evaluators import INCEPTION_RESIZE, EvaluatorError, load_evaluator
    from loratk.evaluation.features import FeatureCache

    started = time.perf_counter()
    result = EvalResult()
    wanted = [name for name in settings.metrics if name in IMAGE_METRICS]
    generated = [path for path, _ in images.generated]
    result.counts = {"generated": len(generated), "real": len(real), "pairs": len(images.leak_pairs)}
    kinds = {IMAGE_METRICS[name] for name in wanted}
    result.settings = {kind: name for kind, name in settings.evaluators.items() if kind in kinds}
    result.settings["library"] = f"torchmetrics {_version('torchmetrics')}"
    if "inception" in kinds:
        result.settings["resize"] = INCEPTION_RESIZE
    cache = FeatureCache(settings.cache_dir)
    gen = _Generated(
        images=[_open_rgb(p) for p in generated],
        prompts=[prompt for _, prompt in images.generated],
        labels=[p.name for p in generated],
    )

    def record(name: str, compute: Callable[[], float | tuple[float, float]]) -> None:
        try:
            value = compute()
        except m.MetricError as err:
            result.notes.append(str(err))
            return
        if isinstance(value, tuple):
            result.metrics[name], result.metrics[f"{name}_std"] = value
        else:
            result.metrics[name] = value

    for kind in EVALUATOR_KINDS:
        names = [name for name in wanted if IMAGE_METRICS[name] == kind]
        if not names:
            continue
        model_name = settings.evaluators.get(kind, "")
        if not model_name:
            result.notes.append(f"{', '.join(names)}: skipped (eval.{kind} is empty)")
            continue
        if not gen.images:
            result.notes.append(f"{', '.join(names)}: no generated images to score")
            continue
        try:
            evaluator = load_evaluator(
                kind,
                model_name,
                device=settings.device,
                dtype=settings.dtype,
                batch_size=settings.batch_size,
                cache_dir=settings.model_cache_dir,
            )
        except EvaluatorError as err:
            result.notes.append(f"{', '.join(names)}: skipped ({err})")
            continue
        with evaluator:
            try:  # features first: a non-finite image stops this evaluator's metrics, not the others
                scorers = _SCORERS[kind](evaluator, gen, real, cache)
            except m.MetricError as err:
                result.notes.append(f"{', '.join(names)}: skipped ({err})")
                continue
            for name in names:
                record(name, scorers[name])
    if "fid" in result.metrics:
        note = m.fid_note(len(real), len(generated))
        if note:
            result.notes.append(note)
    pixel = [name for name in wanted if IMAGE_METRICS[name] is None]
    if pixel and images.leak_pairs:
        base = _pixels([a for a, _ in images.leak_pairs])
        tuned = _pixels([b for _, b in images.leak_pairs])
        for name in pixel:
            record(name, lambda name=name: getattr(m, name)(base, tuned))
    result.time_s = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class _Generated:
    images: list[Image.Image]
    prompts: list[str]
    labels: list[str]  # file names, for the messages


Scorers = dict[str, Callable[[], Any]]


def _inception_scorers(evaluator: Any, gen: _Generated, real: Sequence[Path], cache: Any) -> Scorers:
    from loratk.evaluation import metrics as m

    features, logits = evaluator.features_and_logits(gen.images)
    m.check_finite("inception", features, gen.labels)
    real_features, _ = cache.features_and_logits(evaluator, real)
    return {
        "kid": lambda: m.kernel_distance(real_features, features),
        "fid": lambda: m.frechet_distance(real_features, features),
        "is": lambda: m.inception_score(logits),
    }


def _clip_scorers(evaluator: Any, gen: _Generated, real: Sequence[Path], cache: Any) -> Scorers:
    from loratk.evaluation import metrics as m

    features = evaluator.image_features(gen.images)
    m.check_finite("clip", features, gen.labels)
    return {
        "clip_t": lambda: m.mean_paired_cosine(features, evaluator.text_features(gen.prompts)),
        "clip_i": lambda: m.mean_pairwise_cosine(features, cache.image_features(evaluator, real)),
    }


def _dino_scorers(evaluator: Any, gen: _Generated, real: Sequence[Path], cache: Any) -> Scorers:
    from loratk.evaluation import metrics as m

    features = evaluator.image_features(gen.images)
    m.check_finite("dino", features, gen.labels)
    return {"dino": lambda: m.mean_pairwise_cosine(features, cache.image_features(evaluator, real))}


def _dinov2_scorers(evaluator: Any, gen: _Generated, real: Sequence[Path], cache: Any) -> Scorers:
    from loratk.evaluation import metrics as m

    features = evaluator.image_features(gen.images)
    m.check_finite("dinov2", features, gen.labels)
    real_features = cache.image_features(evaluator, real)
    return {
        "fd_dinov2": lambda: m.frechet_distance(real_features, features),
        "kid_dinov2": lambda: m.kernel_distance(real_features, features),
    }


_SCORERS = {
    "clip": _clip_scorers,
    "dino": _dino_scorers,
    "dinov2": _dinov2_scorers,
    "inception": _inception_scorers,
}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
