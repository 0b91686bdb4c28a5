"""Optimizer and learning-rate schedule from plain arguments (the recipe is unpacked by train.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

OPTIMIZERS = ("adafactor", "adamw", "adamw8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


def build_optimizer(
    param_groups: Iterable[dict[str, Any]],
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused_backward: bool = False,
    max_grad_norm: float | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer over `param_groups` (each may carry its own `lr` and a `name`).

    `fused_backward`: one optimizer per parameter, stepped inside backward (see `FusedBackwardOptimizer`);
    `max_grad_norm` then clips each parameter's gradient on its own.
    """
    groups = [dict(g) for g in param_groups]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("no trainable parameters: the adapter froze everything")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")

    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return _build_plain(groups, name, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    if fused_backward:
        return FusedBackwardOptimizer(groups, build, lr=lr, max_grad_norm=max_grad_norm)
    return build(groups)


def _build_plain(
    groups: list[dict[str, Any]],
    name: str,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.Optimizer:
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate needs all three switches off; relative_step=True ignores `lr` entirely.
        return Adafactor(
            groups,
            lr=lr,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "optim.name = 'adamw8bit' needs bitsandbytes: pip install 'loratk[bnb]' "
                "(or choose optim.name = 'adafactor' / 'adamw')"
            ) from err
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """Steps each parameter as soon as its gradient is complete, from `register_post_accumulate_grad_hook`,
    then frees that gradient: the full set of gradients is never held at once (the 24 GB SDXL recipe).

    Each parameter has its own inner optimizer (same class and options), so the update is the plain
    optimizer's update. The loop's `step()` / `zero_grad()` are no-ops here; the learning rate of each group
    (set by the scheduler) is copied to the inner optimizers before every step; `state_dict()` holds every
    inner state, so resumable states work. `max_grad_norm` clips each parameter's gradient on its own.

    Skipping a non-finite step: the training loop sets `step_gate`, a callable that says whether this step's
    loss was finite (read once per step, without a host sync per parameter); a False skips every update of
    the step. Without a gate (standalone use) each gradient is checked on its own, one host sync per
    parameter. Gradient accumulation and multi-process training are not possible (the recipe and `train.py`
    refuse them).
    """

    step_gate: Callable[[], bool] | None = None

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        *,
        lr: float,
        max_grad_norm: float | None = None,
    ):
        super().__init__(param_groups, {"lr": lr})
        self.max_grad_norm = max_grad_norm
        self.skipped = 0  # parameter updates skipped for a non-finite gradient
        self._inner: dict[torch.nn.Parameter, tuple[dict[str, Any], torch.optim.Optimizer]] = {}
        self._handles = []
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                self._inner[param] = (group, build([{**options, "params": [param]}]))
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_param))

    @torch.no_grad()
    def _step_param(self, param: torch.Tensor) -> None:
        group, inner = self._inner[param]
        if param.grad is None:
            return
        finite = self.step_gate() if self.step_gate is not None else bool(torch.isfinite(param.grad).all())
        if not finite:
            self.skipped += 1
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            for inner_group in inner.param_groups:
                inner_group["lr"] = group["lr"]
            inner.step()
        param.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Nothing left to do: every parameter was stepped during backward."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._inner:
            param.grad = None

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [inner for _, inner in self._inner.values()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lrs": [group["lr"] for group in self.param_groups],
            "inner": [inner.state_dict() for inner in self.inner_optimizers()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inners = self.inner_optimizers()
        if len(state_dict["inner"]) != len(inners):
            raise ValueError(
                f"fused optimizer state holds {len(state_dict['inner'])} parameters, this run trains {len(inners)}"
            )
        for group, lr in zip(self.param_groups, state_dict["lrs"], strict=True):
            group["lr"] = lr
        for inner, sd in zip(inners, state_dict["inner"], strict=True):
            inner.load_state_dict(sd)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule stepped once per optimizer step (not per process, not per micro-batch)."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
