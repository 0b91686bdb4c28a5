"""What the model is trained on and how the loss is built: one small strategy per objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward runs on
    logs: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # extra detached scalars (e.g. train/prior_loss)
    num_images: int = 0
    sample_ids: list[str] = field(default_factory=list)  # what the batch held (for batch-content checks)


class Objective(Protocol):
    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        """Loss for one micro-batch. Never calls backward."""
