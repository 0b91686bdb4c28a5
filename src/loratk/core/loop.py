"""THE training loop. It knows nothing about SDXL, LoRA or DreamBooth: it runs an objective's loss through
Accelerate (accumulate, backward, clip, step), logs, and calls the epoch-end hooks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from loratk.objectives import Objective
from loratk.plan import TrainPlan

logger = get_logger(__name__)

EpochHook = Callable[[int, int], None]  # (epoch, global_step) -> None, run on the main process


@dataclass
class LoopResult:
    global_step: int
    epochs_done: int
    losses: list[float] = field(default_factory=list)


def compute_step_seed(seed: int, micro_step: int, process_index: int) -> int:
    """A fresh seed per micro-step and process, so the noise drawn at step k depends on nothing else."""
    return (seed * 1_000_003 + micro_step * 7919 + process_index * 104_729) % (2**31 - 1)


class MetricsWriter:
    """Appends one JSON line per logged step; flushed at once so a crash loses nothing already logged."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [group.get("name", f"group{i}") for i, group in enumerate(optimizer.param_groups)]


def run_training(
    accelerator: Any,
    *,
    objective: Objective,
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    dataloader: Any,
    plan: TrainPlan,
    seed: int,
    max_grad_norm: float | None = None,
    log_every_n_steps: int = 1,
    metrics: MetricsWriter | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
) -> LoopResult:
    """Train for `plan.total_steps` optimizer steps; return the step count and the logged losses."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = _group_names(optimizer)
    result = LoopResult(global_step=0, epochs_done=0)
    bar = tqdm(total=plan.total_steps, desc="train", unit="step", disable=not accelerator.is_main_process)
    micro_step = 0
    for module in modules:
        module.train()
    for epoch in range(1, plan.num_epochs + 1):
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=accelerator.device)
        images = micro_batches = 0
        window_start = time.perf_counter()
        for batch in dataloader:
            set_seed(compute_step_seed(seed, micro_step, accelerator.process_index))
            micro_step += 1
            with accelerator.accumulate(*modules):
                out = objective.compute_loss(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach()
            images += out.num_images
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            result.global_step += 1
            bar.update(1)
            if result.global_step % log_every_n_steps == 0 or result.global_step == plan.total_steps:
                # The only host sync of the step, and only at log steps.
                loss = accelerator.gather(loss_sum).mean().item() / micro_batches
                elapsed = time.perf_counter() - window_start
                record = {"step": result.global_step, "epoch": epoch, "train/loss": loss}
                record.update(
                    {f"lr/{n}": g["lr"] for n, g in zip(names, optimizer.param_groups, strict=True)}
                )
                record["perf/images_per_s"] = images * accelerator.num_processes / elapsed if elapsed else 0.0
                if torch.cuda.is_available():
                    record["mem/peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
                result.losses.append(loss)
                if accelerator.is_main_process:
                    if metrics is not None:
                        metrics.write(record)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record[f'lr/{names[0]}']:.2e}")
                accelerator.log(record, step=result.global_step)
                if not math.isfinite(loss):
                    logger.warning(f"step {result.global_step}: loss is {loss}")
                loss_sum.zero_()
                images = micro_batches = 0
                window_start = time.perf_counter()
            if result.global_step >= plan.total_steps:
                break
        result.epochs_done = epoch
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for hook in epoch_hooks:
                hook(epoch, result.global_step)
        accelerator.wait_for_everyone()
        if result.global_step >= plan.total_steps:
            break
    bar.close()
    return result
