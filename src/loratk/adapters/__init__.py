"""What is trained, how it is exported and reloaded: one small strategy per kind of adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Adapter(Protocol):
    """The adapter strategy the training loop and exporter rely on."""

    fp32_parts: tuple[str, ...]  # model parts (`unet`, ...) loaded and kept in fp32 because they train whole

    def apply(self, model: Any) -> None:
        """Freeze the base model and make the adapter's parameters trainable (fp32)."""

    def trainable_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        """The model parts that hold trainable parameters, by name (`unet`, `text_encoder`, ...)."""

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with a `name` used for metric keys (`lr/unet`)."""

    def export(self, model: Any, path: Path, metadata: dict[str, str]) -> list[Path]:
        """Write what a user loads; return the files written."""
