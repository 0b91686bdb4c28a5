"""Optimizer and learning-rate schedule from plain arguments (the recipe is unpacked by train.py)."""

from __future__ import annotations

from collections.abc import Iterable
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
) -> torch.optim.Optimizer:
    """Build the optimizer over `param_groups` (each may carry its own `lr` and a `name`)."""
    groups = [dict(g) for g in param_groups]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("no trainable parameters: the adapter froze everything")
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


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule stepped once per optimizer step (not per process, not per micro-batch)."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
