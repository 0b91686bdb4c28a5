"""DreamBooth objective: instance loss + prior_loss_weight x class loss (prior preservation)."""

from __future__ import annotations

from typing import Any

from loratk.core.diffusion_math import compute_prior_preservation_loss
from loratk.core.protocols import LossOutput
from loratk.objectives.denoising import Denoiser


class DreamBoothObjective:
    """Batches hold `num_instance` instance examples followed by their class examples (if any).

    One UNet forward runs over the whole batch; the per-sample losses are split back into the two halves.
    """

    def __init__(self, denoiser: Denoiser, *, prior_loss_weight: float = 1.0):
        self.denoiser = denoiser
        self.prior_loss_weight = prior_loss_weight

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        inputs = self.denoiser.encode_batch(batch)
        losses = self.denoiser.per_sample_loss(inputs)  # [B_instance + B_class]
        n = batch["num_instance"]
        instance_loss = losses[:n].mean()
        logs = {"train/instance_loss": instance_loss.detach()}
        if losses.shape[0] > n:
            class_loss = losses[n:].mean()
            loss = compute_prior_preservation_loss(instance_loss, class_loss, self.prior_loss_weight)
            logs["train/prior_loss"] = class_loss.detach()
        else:
            loss = instance_loss
        return LossOutput(loss=loss, logs=logs, num_images=n, sample_ids=list(batch.get("paths", [])))
