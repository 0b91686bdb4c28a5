"""THE training loop. It knows nothing about SDXL, LoRA or DreamBooth: it runs an objective's loss through
Accelerate (accumulate, backward, clip, step), logs, saves resumable state, and calls the hooks.

Exact resume rests on three things: batch order is a function of (seed, epoch), the batches an interrupted
epoch already consumed are skipped, and the RNG is reseeded from (seed, micro-step, rank) before every batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from loratk.core.checkpoint import TrainState
from loratk.core.interrupts import StopRequest, TrainingInterrupted
from loratk.core.protocols import EpochHook, Objective, StepHook
from loratk.plan import TrainPlan

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def on_main_process(accelerator: Any, hook: EpochHook) -> EpochHook:
    """An epoch hook that only the main process runs (sampling, reports); its metrics come from there."""

    def run(epoch: int, global_step: int) -> Mapping[str, float] | None:
        return hook(epoch, global_step) if accelerator.is_main_process else None

    return run


@dataclass
class LoopResult:
    state: TrainState
    losses: list[float] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return self.state.global_step


def compute_step_seed(seed: int, micro_step: int, process_index: int) -> int:
    """A fresh seed per micro-step and process, so the noise drawn at step k depends on nothing else."""
    return (seed * 1_000_003 + micro_step * 7919 + process_index * 104_729) % (2**31 - 1)


class MetricsWriter:
    """Appends one JSON line per logged step, flushed at once. On resume, lines past the resumed step are
    dropped first, so every step appears exactly once."""

    def __init__(self, path: Path | None, resume_step: int | None = None):
        self.path = path
        self._fh = None
        if path is None:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            clean = {
                k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                for k, v in record.items()
            }
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def compute_peak_memory_gib() -> float | None:
    """Peak accelerator memory reserved so far, in GiB (None without CUDA). Reads a counter: no sync."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def epoch_usage(started: float) -> dict[str, float]:
    """An epoch's wall time (training and its hooks) and the peak memory so far: the GPU's reserved memory,
    or without one this process's peak resident set."""
    import resource

    usage = {"time/epoch_s": time.perf_counter() - started}
    peak_gib = compute_peak_memory_gib()
    if peak_gib is not None:
        usage["mem/peak_gib"] = peak_gib
    else:  # Linux reports kibibytes
        usage["mem/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return usage


def format_progress(record: dict[str, Any], first_group: str) -> dict[str, str]:
    """The progress bar's postfix: loss, lr, images/s and (on a GPU) peak memory."""
    postfix = {
        "loss": f"{record['train/loss']:.4f}",
        "lr": f"{record[f'lr/{first_group}']:.2e}",
        "img/s": f"{record['perf/images_per_s']:.2f}",
    }
    if "mem/peak_gib" in record:
        postfix["mem"] = f"{record['mem/peak_gib']:.1f}GiB"
    return postfix


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [group.get("name", f"group{i}") for i, group in enumerate(optimizer.param_groups)]


class StepAgreement:
    """What every rank must agree on at each optimizer step: was the loss finite on all ranks, and did any
    rank get a stop request. Without stalling the device:

    `launch` runs right after the last forward pass of a step: one all-reduce of two numbers (multi-process)
    and a non-blocking copy into pinned host memory. `read` runs after `backward` was queued, so it waits
    for the forward pass only, while the device still has the whole backward to work on. These are the only
    host reads of a non-logging step.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self._cuda = accelerator.device.type == "cuda"
        self._host = torch.zeros(2, pin_memory=self._cuda)
        self._event = None
        self._read: tuple[bool, bool] | None = None

    def launch(self, step_loss: torch.Tensor, stop_requested: bool) -> None:
        nonfinite = (~torch.isfinite(step_loss)).to(torch.float32).reshape(1)
        # `full` is a fill on the device: no host-to-device copy to wait for.
        stop = torch.full((1,), float(stop_requested), device=nonfinite.device)
        flags = torch.cat([nonfinite, stop])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        self._host.copy_(flags, non_blocking=self._cuda)
        if self._cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._read = None

    def read(self) -> tuple[bool, bool]:
        """(finite on every rank, stop requested on some rank) for the step launched last."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            nonfinite, stop = self._host.tolist()
            self._read = (nonfinite == 0.0, stop > 0.0)
        return self._read

    def finite(self) -> bool:
        return self.read()[0]


def _stop_everywhere(accelerator: Any, stop: StopRequest | None) -> bool:
    if stop is None:
        return False
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _steps_in_backward(optimizer: Any) -> Any:
    """The optimizer (unwrapped from Accelerate's wrapper) when it steps inside backward, else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "step_gate") else None


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
    state: TrainState | None = None,
    max_grad_norm: float | None = None,
    log_every_n_steps: int = 1,
    metrics: MetricsWriter | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
    step_hooks: Sequence[StepHook] = (),
    save_state: Callable[[TrainState], Path] | None = None,
    save_every_n_steps: int | None = None,
    max_nonfinite_steps: int = 5,
    stop: StopRequest | None = None,
) -> LoopResult:
    """Train from `state` (a fresh start by default) to `plan.total_steps` optimizer steps."""
    state = state or TrainState()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = _group_names(optimizer)
    result = LoopResult(state=state)
    main = accelerator.is_main_process
    bar = tqdm(total=plan.total_steps, initial=state.global_step, desc="train", unit="step", disable=not main)
    consecutive_nonfinite = 0
    for module in modules:
        module.train()
    agreement = StepAgreement(accelerator)
    fused = _steps_in_backward(optimizer)
    if fused is not None and accelerator.gradient_accumulation_steps > 1:
        # It would update every weight at every micro-batch: a smaller effective batch than the plan says,
        # with a finite-loss gate that only the syncing micro-steps refresh.
        raise ValueError(
            "an optimizer that steps inside backward cannot accumulate gradients "
            f"(gradient_accumulation_steps = {accelerator.gradient_accumulation_steps}); use 1"
        )
    if fused is not None:
        fused.step_gate = agreement.finite  # a non-finite step skips every parameter's in-backward update

    def interrupt_if_requested(agreed: bool | None = None) -> None:
        """`agreed`: the step's agreed stop flag (multi-process); else ask the ranks now (an epoch end)."""
        several = accelerator.num_processes > 1
        if agreed if (several and agreed is not None) else _stop_everywhere(accelerator, stop):
            where = save_state(state) if save_state else None
            saved = f"state saved to {where}" if where else "no state saved"
            raise TrainingInterrupted(
                stop.signal_name or "SIGTERM", f"stopped at step {state.global_step} ({saved})"
            )

    while not state.finished(plan.total_steps, plan.num_epochs):
        epoch = state.epoch
        epoch_started = time.perf_counter()
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        batches = dataloader
        if state.batches_done:
            batches = accelerator.skip_first_batches(dataloader, state.batches_done)
        window_loss = torch.zeros((), device=accelerator.device)
        window_logs: dict[str, torch.Tensor] = {}  # the objective's extra scalars, summed on the device
        step_loss = torch.zeros((), device=accelerator.device)
        images = micro_batches = 0
        ids: list[str] = []
        window_start = time.perf_counter()
        for batch in batches:
            if state.global_step >= plan.total_steps:
                break
            set_seed(compute_step_seed(seed, state.micro_step, accelerator.process_index))
            state.micro_step += 1
            state.batches_done += 1
            with accelerator.accumulate(*modules):
                out = objective.compute_loss(batch)
                step_loss += out.loss.detach()
                stepped = stop_agreed = None
                if accelerator.sync_gradients:
                    agreement.launch(step_loss, stop is not None and stop.requested)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    stepped, stop_agreed = agreement.read()
                    if stepped:
                        if max_grad_norm is not None:
                            accelerator.clip_grad_norm_(params, max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            window_loss += out.loss.detach()
            for key, value in out.logs.items():
                window_logs[key] = window_logs.get(key, 0) + value.detach().float()
            images += out.num_images
            micro_batches += 1
            ids.extend(out.sample_ids)
            if stepped is None:
                continue
            step_loss.zero_()
            lr_scheduler.step()
            state.global_step += 1
            bar.update(1)
            if stepped:
                consecutive_nonfinite = 0
            else:
                consecutive_nonfinite += 1
                state.nonfinite_steps += 1
                logger.warning(
                    f"step {state.global_step}: non-finite loss, update skipped", main_process_only=True
                )
            if state.global_step % log_every_n_steps == 0 or state.global_step == plan.total_steps:
                loss = accelerator.gather(window_loss).mean().item() / micro_batches  # the sync of a log step
                elapsed = time.perf_counter() - window_start
                record = {"step": state.global_step, "epoch": epoch, "train/loss": loss}
                if window_logs:  # one gather for all of them (a log step's host read)
                    names_logs = sorted(window_logs)
                    stacked = accelerator.gather(torch.stack([window_logs[k] for k in names_logs])[None])
                    record.update(
                        zip(names_logs, (stacked.mean(dim=0) / micro_batches).tolist(), strict=True)
                    )
                record.update(
                    {f"lr/{n}": g["lr"] for n, g in zip(names, optimizer.param_groups, strict=True)}
                )
                record["train/nonfinite_steps"] = state.nonfinite_steps
                record["perf/images_per_s"] = images * accelerator.num_processes / elapsed if elapsed else 0.0
                peak_gib = compute_peak_memory_gib()
                if peak_gib is not None:
                    record["mem/peak_gib"] = peak_gib
                if ids:
                    record["data/batch_sha1"] = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
                result.losses.append(loss)
                if main:
                    if metrics is not None:
                        metrics.write(record)
                    bar.set_postfix(format_progress(record, names[0]))
                accelerator.log(record, step=state.global_step)
                window_loss.zero_()
                window_logs = {}
                images = micro_batches = 0
                ids = []
                window_start = time.perf_counter()
            if consecutive_nonfinite >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} optimizer steps in a row had a non-finite loss (last at step "
                    f"{state.global_step}); the last saved state and exported files are untouched. Try "
                    "mixed_precision = 'bf16' instead of 'fp16', or a lower learning rate."
                )
            if save_state and save_every_n_steps and state.global_step % save_every_n_steps == 0:
                save_state(state)
            for hook in step_hooks:
                hook(state)
            interrupt_if_requested(stop_agreed)
            if state.global_step >= plan.total_steps:
                break
        accelerator.wait_for_everyone()
        hooks = [
            *epoch_hooks,
            lambda _epoch, _step, t=epoch_started: epoch_usage(t),
        ]  # usage: after the hooks
        for hook in hooks:
            reported = hook(epoch, state.global_step)
            if reported:  # e.g. an evaluation's metrics, one line per epoch in metrics.jsonl
                record = {"step": state.global_step, "epoch": epoch, **reported}
                if main and metrics is not None:
                    metrics.write(record)
                accelerator.log(dict(reported), step=state.global_step)
        accelerator.wait_for_everyone()
        state.epoch, state.batches_done = epoch + 1, 0
        if save_state:
            save_state(state)
        interrupt_if_requested()
    bar.close()
    return result
