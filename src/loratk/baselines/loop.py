"""The GAN loop: per batch one discriminator step, and a generator step every `critic_steps` of them.

It is a loop of its own because the shared one (`core.loop`) runs one objective's loss through one optimizer
per step, with gradient accumulation and sharded engines; alternating two networks with two optimizers on a
schedule would mean branching on the method there. What it reuses instead: the resumable state and its
manager (`core.checkpoint`), the per-step reseeding and the epoch hooks' protocol and metrics writer
(`core.loop`), the stop request and interruption (`core.interrupts`). Exact resume rests on the same three
things: batch order from (seed, epoch), skipping consumed batches, reseeding from (seed, micro-step).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from loratk.baselines.losses import generator_step_due
from loratk.baselines.steps import GanSteps
from loratk.core.checkpoint import TrainState
from loratk.core.interrupts import StopRequest, TrainingInterrupted
from loratk.core.loop import (
    LoopResult,
    MetricsWriter,
    NonFiniteLossError,
    compute_peak_memory_gib,
    compute_step_seed,
)
from loratk.core.protocols import EpochHook

logger = get_logger(__name__)


def compute_peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _memory() -> dict[str, float]:
    peak = compute_peak_memory_gib()
    return {"mem/peak_gib": peak} if peak is not None else {"mem/peak_rss_gib": compute_peak_rss_gib()}


class _Window:
    """Logged scalars averaged over the steps that reported them since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.start = time.perf_counter()

    def add(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in sorted(self.sums)}


def run_gan_training(
    accelerator: Any,
    *,
    steps: GanSteps,
    dataloader: Any,
    num_epochs: int,
    critic_steps: int,
    seed: int,
    lr_schedulers: tuple[Any, Any] | None = None,  # (generator's, discriminator's), each after its own step
    state: TrainState | None = None,
    log_every_n_steps: int = 1,
    metrics: MetricsWriter | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
    save_state: Callable[[TrainState], Path] | None = None,
    save_every_n_steps: int | None = None,
    max_nonfinite_steps: int = 5,
    stop: StopRequest | None = None,
) -> LoopResult:
    """Train from `state` to the end of `num_epochs`; `global_step` counts discriminator steps (batches)."""
    state = state or TrainState()
    total_steps = len(dataloader) * num_epochs
    result = LoopResult(state=state)
    bar = tqdm(total=total_steps, initial=state.global_step, desc="train gan", unit="step")
    steps.generator.train()
    steps.discriminator.train()
    consecutive_nonfinite = 0
    groups = {"generator": steps.g_optimizer, "discriminator": steps.d_optimizer}

    def interrupt_if_requested() -> None:
        if stop is not None and stop.requested:
            where = save_state(state) if save_state else None
            saved = f"state saved to {where}" if where else "no state saved"
            raise TrainingInterrupted(
                stop.signal_name or "SIGTERM", f"stopped at step {state.global_step} ({saved})"
            )

    while not state.finished(total_steps, num_epochs):
        epoch = state.epoch
        dataloader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(dataloader, state.batches_done)
            if state.batches_done
            else dataloader
        )
        window = _Window()
        epoch_start = time.perf_counter()
        for batch in batches:
            set_seed(compute_step_seed(seed, state.micro_step, accelerator.process_index))
            state.micro_step += 1
            state.batches_done += 1
            real = batch["pixel_values"].to(accelerator.device)  # [B, 3, R, R] in [-1, 1]
            d_out = steps.discriminator_step(real)
            finite = d_out.finite
            window.add(d_out.logs)
            if lr_schedulers is not None:
                lr_schedulers[1].step()
            if generator_step_due(state.global_step + 1, critic_steps):
                g_out = steps.generator_step(real.shape[0], real.device)
                finite = finite and g_out.finite
                window.add(g_out.logs)
                if lr_schedulers is not None:
                    lr_schedulers[0].step()
            window.images += real.shape[0]
            state.global_step += 1
            bar.update(1)
            if finite:
                consecutive_nonfinite = 0
            else:
                consecutive_nonfinite += 1
                state.nonfinite_steps += 1
                logger.warning(f"step {state.global_step}: non-finite loss, update skipped")
            if state.global_step % log_every_n_steps == 0 or state.global_step == total_steps:
                elapsed = time.perf_counter() - window.start
                record: dict[str, Any] = {"step": state.global_step, "epoch": epoch, **window.means()}
                record |= steps.state_logs()
                record |= {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in groups.items()}
                record["train/nonfinite_steps"] = state.nonfinite_steps
                record["perf/images_per_s"] = window.images / elapsed if elapsed else 0.0
                record |= _memory()
                result.losses.append(record.get("train/d_loss", float("nan")))
                if metrics is not None:
                    metrics.write(record)
                bar.set_postfix(
                    {
                        k.split("/")[-1]: f"{record[k]:.3f}"
                        for k in ("train/d_loss", "train/g_loss")
                        if k in record
                    }
                )
                window = _Window()
            if consecutive_nonfinite >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} steps in a row had a non-finite loss (last at step "
                    f"{state.global_step}); the last saved state and generator files are untouched. Try "
                    "lower learning rates (gan.d_lr, gan.g_lr)."
                )
            if save_state and save_every_n_steps and state.global_step % save_every_n_steps == 0:
                save_state(state)
            interrupt_if_requested()
        trained_s = time.perf_counter() - epoch_start
        reported: dict[str, Any] = {}
        for hook in epoch_hooks:
            reported |= hook(epoch, state.global_step) or {}
        if metrics is not None:
            metrics.write(
                {
                    "step": state.global_step,
                    "epoch": epoch,
                    **reported,
                    "time/epoch_s": trained_s,
                    **_memory(),
                }
            )
        state.epoch, state.batches_done = epoch + 1, 0
        if save_state:
            save_state(state)
        interrupt_if_requested()
    bar.close()
    return result
