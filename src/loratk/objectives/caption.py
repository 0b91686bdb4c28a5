"""Caption objective: captioned images (style or character), plain denoising loss."""

from __future__ import annotations

from typing import Any

from loratk.objectives import LossOutput
from loratk.objectives.denoising import SDXLDenoiser


class CaptionObjective:
    def __init__(self, denoiser: SDXLDenoiser):
        self.denoiser = denoiser

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        inputs = self.denoiser.encode_batch(batch)
        loss = self.denoiser.per_sample_loss(inputs).mean()
        return LossOutput(
            loss=loss, num_images=inputs["latents"].shape[0], sample_ids=list(batch.get("paths", []))
        )
