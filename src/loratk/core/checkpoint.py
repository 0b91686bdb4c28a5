"""Checkpoints: atomic file writes, and resumable training state (save, retention, resume-latest, run lock).

Atomic: a crash or a full disk never leaves a half file under the real name. A state lives in
`runs/<name>/state/step-NNNNNNNN/`: Accelerate's `save_state` (trainable weights only, optimizer, scheduler)
plus our counters and the recipe; `COMPLETE` is written last, and only complete states are resumed from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loratk.core.engine import engine_kind


class OutputWriteError(OSError):
    """A file could not be written; the message names it, and the previous version is intact."""

    def __init__(self, path: Path, err: OSError, kept: str = "; the previous file (if any) is unchanged"):
        super().__init__(err.errno, err.strerror or str(err))
        reason = err.strerror or str(err)
        hint = (
            "free some disk space and retry"
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            else "check the path"
        )
        self.message = f"could not write {path}: {reason} ({hint}){kept}"

    def __str__(self) -> str:
        return self.message


_OS_ERROR = re.compile(r"os error (\d+)")


def _is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or _OS_ERROR.search(str(err)) is not None


def _as_oserror(err: BaseException) -> OSError:
    """An OSError for `err`; libraries written in Rust (safetensors) report `(os error 28)` in their text."""
    if isinstance(err, OSError):
        return err
    match = _OS_ERROR.search(str(err))
    code = int(match[1]) if match else errno.EIO
    return OSError(code, os.strerror(code))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the block succeeds, fsync it and rename it over `path`.

    The file gets normal permissions (0666 & ~umask), not mkstemp's 0600. On any error the temp file is
    removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What loratk's own interrupted writes leave: `atomic_path` temp files (`.epoch1.safetensors.k2x9ab.tmp`), the
# temp folders of folder exports (`.epoch1_diffusers.k2x9ab`) and unfinished states (`.step-00000012.partial`).
_STALE = re.compile(r"^\.(.+\.[A-Za-z0-9_]{8}\.tmp|.+_diffusers\.[A-Za-z0-9_]{8}|step-\d{8}\.partial)$")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed writes of loratk left in a run folder (its top level, `state/`, `class_images/`,
    `samples/` and its epoch folders).

    Only names that loratk's own temporary files have; call it while holding the run's lock, so no other
    training is writing there.
    """
    removed = []
    samples = run_dir / "samples"
    folders = [run_dir, run_dir / "state", run_dir / "class_images", samples]
    folders += sorted(p for p in samples.iterdir() if p.is_dir()) if samples.is_dir() else []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _STALE.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def verify_safetensors(path: str | os.PathLike, expected: dict) -> None:
    """Read a written file back: same keys, same shapes, all finite. Raise ValueError naming the file if not."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            if keys != set(expected):
                missing, extra = set(expected) - keys, keys - set(expected)
                raise ValueError(
                    f"{path}: written keys differ (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
                )
            for key in keys:
                tensor = fh.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise ValueError(
                        f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                    )
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(f"{path}: {key} is not finite")
    except (OSError, RuntimeError) as err:  # safetensors' own errors do not name the file
        raise ValueError(f"{path}: cannot read back the written file ({err})") from err


_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def serialize_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors format with sorted keys, so the same tensors and metadata always give the same bytes.

    (`safetensors.torch.save` writes the metadata map in a random order per process.) Reading goes through the
    safetensors library; `verify_safetensors` checks every file written this way.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def save_safetensors_atomic(
    tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomic, deterministic save that reads the temp file back (keys, shapes, finiteness) before it replaces
    `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialize_safetensors(tensors, metadata))
        verify_safetensors(tmp, tensors)


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Load tensors and metadata; errors from damaged files name the file and say what to do."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
            return tensors, dict(fh.metadata() or {})
    except Exception as err:  # SafetensorError, OSError: header too small, incomplete metadata ...
        raise ValueError(
            f"{path}: not a readable .safetensors file ({err}); it may be truncated or in another format"
        ) from err


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

    def __init__(self, accelerator: Any, root: Path, recipe_toml: str, keep: int | None = None):
        self.accelerator = accelerator
        self.root = root
        self.recipe_toml = recipe_toml
        self.keep = keep
        # Exported weights are the user's files; a state needs only the trainable parameters.
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
            if not _is_write_error(err):
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = list_complete_states(self.root)
            kept = f"; the newest complete state, {newest[0]}, is unchanged" if newest else ""
            raise OutputWriteError(final, _as_oserror(err), kept=kept) from None
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
