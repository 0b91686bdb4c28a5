"""The `[eval]` section: the validation loss on held-out images, and the image metrics of rendered samples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from loratk.evaluation.defaults import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    DEFAULT_DINOV2,
    DEFAULT_INCEPTION,
    DEFAULT_LEAK_PROMPTS,
    IMAGE_METRICS,
)
from loratk.recipe.sections import Section, check_training_prompts

MetricName = Literal[tuple(IMAGE_METRICS)]  # type: ignore[valid-type]  # one list: evaluation.defaults
BestMetric = Literal["auto", "val/loss", MetricName]


class EvalConfig(Section):
    holdout: int = Field(
        0, ge=0, description="images of [data] (DreamBooth: instance images) kept out of training, by seed"
    )
    folder: str | None = Field(
        None, description="a separate folder of validation images, captioned as [data]"
    )
    val_timesteps: int = Field(
        4, ge=1, le=64, description="validation timesteps per image, spread over the schedule, fixed by seed"
    )
    val_every_n_epochs: int = Field(
        1, gt=0, description="validation loss every N epochs (and before training)"
    )
    every_n_epochs: int | None = Field(
        None,
        ge=0,
        description="image metrics every N epochs; default: every sampled epoch; 0 = `loratk eval` only",
    )
    metrics: list[MetricName] = Field(default_factory=lambda: list(IMAGE_METRICS))
    clip: str = Field(DEFAULT_CLIP, description='CLIP for clip_t and clip_i ("" = skip them)')
    dino: str = Field(
        DEFAULT_DINO, description='DINO v1 (ViTModel) or DINOv2 for the dino metric ("" = skip)'
    )
    dinov2: str = Field(DEFAULT_DINOV2, description='DINOv2 for fd_dinov2 and kid_dinov2 ("" = skip)')
    inception: str = Field(
        DEFAULT_INCEPTION,
        description='"torch-fidelity" (needs torch-fidelity), a local .pth weights file, or "" = skip',
    )
    prompts: list[str] = Field(
        default_factory=list, description="extra prompts for the image metrics (beside the [sample] ones)"
    )
    leak_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LEAK_PROMPTS),
        description="prompts without the subject: PSNR/SSIM of base vs epoch measure what leaks ([] = skip)",
    )
    seeds: list[int] | None = Field(
        None, min_length=1, description="seeds of eval prompts; default: [sample]"
    )
    batch_size: int = Field(16, gt=0, description="images per evaluator forward pass")
    best_metric: BestMetric = Field("auto", description="what picks the best epoch; auto = see README")
    best_tolerance: float = Field(
        0.02, ge=0, description="auto: how far below the base model's CLIP-T an epoch may fall"
    )

    _check_prompts = field_validator("prompts", "leak_prompts")(
        classmethod(lambda cls, v: check_training_prompts(v))
    )

    @property
    def scores_while_training(self) -> bool:
        """True when image metrics are computed during training (some epochs, some metrics)."""
        return self.every_n_epochs != 0 and bool(self.metrics)

    @property
    def validates(self) -> bool:
        """True when there are held-out images for the validation loss."""
        return self.holdout > 0 or self.folder is not None

    def evaluator(self, kind: str) -> str:
        """The configured model of an evaluator kind ("clip", "dino", "dinov2", "inception")."""
        return getattr(self, kind)
