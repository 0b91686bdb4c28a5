"""The optimizer's part of the estimate: its state created before the measured step (as a first step creates
it), counted as optimizer state, and the gradients named as they arrive."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loratk.memory.tracker import MemoryTracker

if TYPE_CHECKING:
    from loratk.memory.estimate import _FakeRun


def optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _track_optimizer_state(run: _FakeRun) -> None:
    inner = (
        run.optimizer.inner_optimizers() if hasattr(run.optimizer, "inner_optimizers") else [run.optimizer]
    )
    for optimizer in inner:
        for state in optimizer.state.values():
            run.tracker.track([v for v in state.values() if isinstance(v, torch.Tensor)], "optimizer")


def warm_up_optimizer(run: _FakeRun) -> None:
    """Create the optimizer's state (as its first step does) from zero gradients, then free them: the
    measured step is a later one, with the state already there."""
    inner = (
        run.optimizer.inner_optimizers() if hasattr(run.optimizer, "inner_optimizers") else [run.optimizer]
    )
    for optimizer in inner:
        params = optimizer_params(optimizer)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in params:
            p.grad = None
    _track_optimizer_state(run)


def mark_gradients(params: list[torch.Tensor], tracker: MemoryTracker) -> list[Any]:
    """Name each gradient as it arrives (a tensor hook runs before it is accumulated into `.grad`, and
    before the fused optimizer's post-accumulate hook steps and frees it)."""

    def mark(grad: torch.Tensor) -> torch.Tensor:
        tracker.track([grad], "gradients")
        return grad

    return [param.register_hook(mark) for param in params]
