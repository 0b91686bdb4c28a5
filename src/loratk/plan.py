"""Derived numbers, computed once from the recipe and the data, then logged. The recipe itself never changes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainPlan:
    num_examples: int
    batches_per_epoch: int  # per process
    gradient_accumulation_steps: int
    steps_per_epoch: int  # optimizer steps
    num_epochs: int
    total_steps: int
    per_device_batch: int
    num_processes: int
    effective_batch: int  # per-device batch x processes x accumulation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.num_examples} examples, {self.num_epochs} epoch(s) x {self.steps_per_epoch} step(s) = "
            f"{self.total_steps} optimizer steps; effective batch {self.effective_batch} "
            f"({self.per_device_batch} per device x {self.num_processes} process(es) x "
            f"{self.gradient_accumulation_steps} accumulation)"
        )


def compute_plan(
    *,
    num_examples: int,
    batches_per_epoch: int,
    per_device_batch: int,
    gradient_accumulation_steps: int,
    num_processes: int,
    epochs: int,
    max_steps: int | None,
) -> TrainPlan:
    if batches_per_epoch <= 0:
        raise ValueError(f"no batches: {num_examples} examples give 0 batches of {per_device_batch}")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_steps is not None:
        total_steps, num_epochs = max_steps, math.ceil(max_steps / steps_per_epoch)
    else:
        total_steps, num_epochs = epochs * steps_per_epoch, epochs
    return TrainPlan(
        num_examples=num_examples,
        batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        total_steps=total_steps,
        per_device_batch=per_device_batch,
        num_processes=num_processes,
        effective_batch=per_device_batch * num_processes * gradient_accumulation_steps,
    )
