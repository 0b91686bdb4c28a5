"""The ground floor for every file loratk writes: atomic writes (temp + fsync + rename), deterministic
safetensors, clean-up of what killed writes left, and where loratk keeps its caches.

Atomic: a crash or a full disk never leaves a half file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def default_cache_dir() -> Path:
    """`$LORATK_CACHE`, else `$XDG_CACHE_HOME/loratk` (default `~/.cache/loratk`)."""
    root = os.environ.get("LORATK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loratk"
    )
    return Path(root)


def default_data_cache_dir() -> Path:
    """`<cache>/data`: the latent and text-embedding caches, shared by every run on this machine."""
    return default_cache_dir() / "data"


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


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or _OS_ERROR.search(str(err)) is not None


def as_oserror(err: BaseException) -> OSError:
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
