"""Resumable training state: save, retention, resume-latest, and the run lock.

A state lives in `runs/<name>/state/step-NNNNNNNN/`: Accelerate's `save_state` (trainable weights only,
optimizer, scheduler) plus our counters and the recipe; `COMPLETE` is written last, and only complete states
are resumed from. (Atomic file writes are in `loratk.files`.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loratk.core.engine import engine_kind
from loratk.files import OutputWriteError, as_oserror, is_write_error

# ---------------------------------------------------------------- resumable training state

MARKER = "COMPLETE"
COUNTERS = "loratk_state.json"
RECIPE = "recipe.toml"
_STATE_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where training is: enough to continue exactly (the RNG is reseeded per micro-step from these)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress (1-based)
    batches_done: int = 0  # batches of `epoch` already consumed on each process
    micro_step: int = 0  # batches consumed since the start of training
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss, in total

    def finished(self, total_steps: int, num_epochs: int) -> bool:
        """All steps done and the last epoch closed (its exports written), or every epoch done."""
        return (self.global_step >= total_steps and self.batches_done == 0) or self.epoch > num_epochs

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


class StateError(RuntimeError):
    pass


def state_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_complete_states(root: Path) -> list[Path]:
    """Complete states, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STATE_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_state(path: Path) -> tuple[TrainState, str]:
    """Counters and recipe TOML of a complete state; raise StateError if it is damaged."""
    if not (path / MARKER).is_file():
        raise StateError(
            f"{path}: incomplete state (no {MARKER} marker); it was interrupted while being written"
        )
    try:
        return TrainState.from_json((path / COUNTERS).read_text()), (path / RECIPE).read_text()
    except (OSError, ValueError, TypeError) as err:
        raise StateError(f"{path}: damaged state ({err})") from err


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _trainable_names(models: list) -> list[set[str]]:
    """Trainable parameter names as Accelerate saves them: of the unwrapped model (no DDP `module.` prefix)."""
    from accelerate.utils import extract_model_from_parallel

    unwrapped = [extract_model_from_parallel(m) for m in models]
    return [{n for n, p in m.named_parameters() if p.requires_grad} for m in unwrapped]


class StateManager:
    """Saves, prunes and loads the states of one run. Every process calls save/load; files come from rank 0."""

    def __init__(
        self,
        accelerator: Any,
        root: Path,
        recipe_toml: str,
        keep: int | None = None,
        weights: str = "trainable",
    ):
        self.accelerator = accelerator
        self.root = root
        self.recipe_toml = recipe_toml
        self.keep = keep
        # Exported weights are the user's files; a state needs only the trainable parameters, unless the
        # models are trained whole from scratch ("all": a GAN's BatchNorm statistics are buffers).
        if weights == "trainable":
            accelerator.register_save_state_pre_hook(self._keep_trainable_weights)

    @staticmethod
    def _keep_trainable_weights(models: list, weights: list, output_dir: str) -> None:
        # FSDP and DeepSpeed save their models themselves and hand this hook no weights.
        for i, names in enumerate(_trainable_names(models)[: len(weights)]):
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def save(self, state: TrainState) -> Path:
        """Write a complete state for `state`; on a write error (a full disk) remove the partial folder and
        raise `OutputWriteError`: the previous states are untouched, so rerunning resumes from the newest."""
        final = state_path(self.root, state.global_step)
        tmp = self.root / f".{final.name}.partial"
        acc = self.accelerator
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / COUNTERS).write_text(state.to_json())
                (tmp / RECIPE).write_text(self.recipe_toml)
                _fsync_tree(tmp)
                (tmp / MARKER).write_text("ok\n")  # written last
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self.prune()
        except Exception as err:  # safetensors reports a full disk as SafetensorError, not OSError
            if not is_write_error(err):
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = list_complete_states(self.root)
            kept = f"; the newest complete state, {newest[0]}, is unchanged" if newest else ""
            raise OutputWriteError(final, as_oserror(err), kept=kept) from None
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Delete partial folders and, past `keep`, the oldest complete states (never the newest)."""
        for partial in self.root.glob(".step-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        if self.keep:
            for old in list_complete_states(self.root)[self.keep :]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, models: list) -> TrainState:
        state, _ = read_state(path)
        try:
            self.accelerator.load_state(str(path), strict=False)
        except Exception as err:  # damaged files inside a complete state
            raise StateError(f"{path}: cannot load the saved state ({err})") from err
        if writes_model_files(self.accelerator):
            self._check_all_trainable_loaded(path, models)
        return state

    @staticmethod
    def _check_all_trainable_loaded(path: Path, models: list) -> None:
        from safetensors import safe_open

        for i, names in enumerate(_trainable_names(models)):
            file = path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not file.is_file():
                raise StateError(f"{file}: missing, so the trainable weights cannot be restored")
            with safe_open(str(file), framework="pt") as fh:
                missing = names - set(fh.keys())
            if missing:
                raise StateError(
                    f"{file}: {len(missing)} trainable weights missing, e.g. {sorted(missing)[0]}"
                )


def writes_model_files(accelerator: Any) -> bool:
    """Whether `save_state` writes `model.safetensors` files (trainable weights only, checked on load).
    FSDP and DeepSpeed write their own sharded checkpoint folders instead, whole and loaded by themselves."""
    return engine_kind(accelerator) not in ("FSDP", "DEEPSPEED")


def choose_state(root: Path, resume: str) -> list[Path]:
    """States to try, best first: `auto` = complete states newest first; a path = that state alone."""
    if resume == "never":
        return []
    if resume == "auto":
        return list_complete_states(root)
    path = Path(resume)
    if not path.is_dir():
        raise StateError(
            f"train.resume = {resume!r}: no such state folder; use 'auto' or a state/step-NNNNNNNN path"
        )
    return [path]


class RunLock:
    """An exclusive lock on a run directory; the OS releases it when the process dies, even on SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise StateError(
                f"{self.path.parent}: another training (pid {owner}) is writing to this run directory; "
                "wait for it to finish or give this run another name"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
