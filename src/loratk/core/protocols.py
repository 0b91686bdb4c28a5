"""The contracts the one training loop and the run rely on; methods differ only by the strategies behind them.

- An `Objective` turns a batch into a loss (what is trained on, how the loss is built).
- An `Adapter` decides what trains, in which precision, and how it is exported.
- Hooks run after each epoch (exports, samples, evaluation) and after each optimizer step.

Nothing here knows a model family or a method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from loratk.core.checkpoint import TrainState


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward runs on
    # Extra detached scalars (e.g. `train/prior_loss`): averaged over the logging window into metrics.jsonl.
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    num_images: int = 0
    sample_ids: list[str] = field(default_factory=list)  # what the batch held (for batch-content checks)


@runtime_checkable
class Objective(Protocol):
    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        """Loss for one micro-batch. Never calls backward."""
        ...


Weights = dict[str, dict[str, torch.Tensor]]  # model part ("unet", ...) -> its full state dict


@runtime_checkable
class Adapter(Protocol):
    """What trains and how it leaves the run. `model` is the loaded model (`models.family.DiffusionModel`)."""

    def fp32_parts(self, model: Any) -> tuple[str, ...]:
        """Model parts whose weights stay in fp32 (fully trained ones), never rounded to the mixed dtype."""
        ...

    def apply(self, model: Any) -> None:
        """Make the trainable parameters (inject LoRA layers, or unfreeze whole parts)."""
        ...

    def trainable_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        """The model parts that hold trainable parameters, by part name (what Accelerate prepares)."""
        ...

    def param_groups(self, model: Any, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with a `name` (`lr/<name>` in the metrics) and its `lr`."""
        ...

    def export_metadata(self) -> dict[str, str]:
        """What this adapter adds to a written file's metadata (LoRA rank and alpha; the architecture)."""
        ...

    def export(
        self, model: Any, path: Path, metadata: dict[str, str], weights: Weights | None = None
    ) -> list[Path]:
        """Write the files users load, `path` first; `weights` are full state dicts gathered across
        processes (sharded engines), else the live modules are read."""
        ...


# After each epoch, on every process (gathering sharded weights needs every rank); what a hook writes, it
# writes on the main process only. A hook may return metrics, which the loop writes to metrics.jsonl.
EpochHook = Callable[[int, int], Mapping[str, float] | None]
# After every optimizer step (and after its state was saved), on every process.
StepHook = Callable[["TrainState"], None]
