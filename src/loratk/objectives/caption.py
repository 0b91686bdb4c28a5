"""Caption objective: captioned images (style or character), plain denoising loss."""

from __future__ import annotations

from typing import Any

from loratk.core.protocols import LossOutput
from loratk.objectives.denoising import Denoiser


class CaptionObjective:
    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        inputs = self.denoiser.encode_batch(batch)
        loss = self.denoiser.per_sample_loss(inputs).mean()
        return LossOutput(
            loss=loss, num_images=inputs["latents"].shape[0], sample_ids=list(batch.get("paths", []))
        )
