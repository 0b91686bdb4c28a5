"""Latent and text-embedding caches: one safetensors file per entry, reused across epochs and runs.

Latents are keyed by (image content sha256, transform = bucket, resize, crop, flip) under a folder named
by the VAE's fingerprint; text embeddings by the exact caption text under the text encoders' fingerprint.
A changed image, model, dtype or transform therefore never reads a stale entry. Each entry is written
atomically on its own, so an interrupted build keeps what it finished and the next build continues.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratk.data.buckets import Size, Transform
from loratk.data.images import MAX_PIXELS, ImageLoadError, apply_transform, image_to_tensor, load_image
from loratk.files import save_safetensors_atomic

CACHE_FORMAT = "1"  # bump when the entry layout changes: old entries are then never read


class CacheError(RuntimeError):
    """A cache entry that cannot be built or read; the message names the image (or caption) and the fix."""


def compute_module_fingerprint(modules: Sequence[torch.nn.Module], extra: str = "") -> str:
    """A sha256 over the modules' classes, configs, tensor names, shapes, dtypes and value statistics.

    Cheap enough for the full SDXL text encoders on a GPU (no host copy of the weights), and any retrained,
    swapped or re-cast weight changes it.
    """
    digest = hashlib.sha256(f"loratk-cache-{CACHE_FORMAT}|{extra}".encode())
    for module in modules:
        digest.update(type(module).__name__.encode())
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_")}
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().reshape(-1)
                stats = torch.stack(
                    [flat.float().sum(), flat.float().abs().sum(), (flat.float() ** 2).sum()]
                    if flat.numel()
                    else [torch.zeros(())] * 3
                )
                head = torch.cat([flat[:16], flat[-16:]]).float()
                digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
                digest.update(stats.cpu().double().numpy().tobytes())
                digest.update(head.cpu().double().numpy().tobytes())
    return digest.hexdigest()


def _entry_path(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.safetensors"


def check_entry(
    path: Path, keys: Sequence[str], shapes: dict[str, tuple[int, ...]] | None = None
) -> str | None:
    """Why the cache entry at `path` cannot be used (missing, unreadable, wrong keys or shapes, NaN/inf
    values), or None when it can. Every entry is checked like this before a run reuses it."""
    from safetensors.torch import load_file

    if not path.is_file():
        return "missing"
    try:
        tensors = load_file(str(path))
    except Exception:  # truncated or garbage: safetensors' own error types vary
        return "unreadable"
    if set(tensors) != set(keys):
        return f"holds {sorted(tensors)}, expected {sorted(keys)}"
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            return f"{key} is {tensor.dtype}, not a float tensor"
        expected = (shapes or {}).get(key)
        if expected is not None and tuple(tensor.shape) != expected:
            return f"{key} has shape {tuple(tensor.shape)}, expected {expected}"
        if not torch.isfinite(tensor).all():
            return f"{key} holds NaN/inf values"
    return None


def _check_loaded(
    path: Path, tensors: dict[str, torch.Tensor], what: str, shapes: dict[str, tuple[int, ...]] | None
) -> None:
    for key, tensor in tensors.items():
        expected = (shapes or {}).get(key)
        if (expected is not None and tuple(tensor.shape) != expected) or not torch.isfinite(tensor).all():
            raise CacheError(
                f"{path}: damaged cache entry for {what} ({key}: shape {tuple(tensor.shape)}, NaN/inf or "
                "wrong shape); rerun to rebuild it (entries are checked before training), or delete the file"
            )


def _load(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CacheError(
            f"{path}: cache entry for {what} is missing; the cache was built for other settings"
        ) from None
    except Exception as err:  # safetensors' own messages do not name the file
        raise CacheError(
            f"{path}: damaged cache entry for {what} ({err}); delete the file to rebuild it"
        ) from None


# ---------------------------------------------------------------- latents


@dataclass(frozen=True)
class LatentRequest:
    path: Path  # the image, for decoding and for error messages
    sha256: str  # content hash of the file
    transform: Transform


class LatentCache:
    """Scaled VAE latent distributions (mean, std) per (image content, transform) for one VAE."""

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: str,
        model_id: str = "",
        *,
        channels: int | None = None,
        downscale: int | None = None,
    ):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.folder = self.root / "latents" / fingerprint[:24]
        self.channels = channels  # the VAE's latent channels and pixel-to-latent factor, when known:
        self.downscale = downscale  # entries of another shape are then rebuilt

    def shapes(self, transform: Transform) -> dict[str, tuple[int, ...]] | None:
        if self.channels is None or self.downscale is None:
            return None
        width, height = transform.bucket
        shape = (self.channels, height // self.downscale, width // self.downscale)
        return {"mean": shape, "std": shape}

    def problem(self, sha256: str, transform: Transform) -> str | None:
        """Why the entry cannot be used, or None (see `check_entry`)."""
        return check_entry(self.path_for(sha256, transform), ("mean", "std"), self.shapes(transform))

    def key(self, sha256: str, transform: Transform) -> str:
        return hashlib.sha256(f"{sha256}|{transform.key()}".encode()).hexdigest()

    def path_for(self, sha256: str, transform: Transform) -> Path:
        return _entry_path(self.folder, self.key(sha256, transform))

    def load(
        self, sha256: str, transform: Transform, image: str | os.PathLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each [4, H/8, W/8], already multiplied by the VAE scaling factor."""
        path = self.path_for(sha256, transform)
        tensors = _load(path, f"{image} ({transform.key()})")
        _check_loaded(path, tensors, f"{image} ({transform.key()})", self.shapes(transform))
        return tensors["mean"], tensors["std"]

    def save(self, request: LatentRequest, mean: torch.Tensor, std: torch.Tensor) -> None:
        metadata = {
            "loratk.cache_format": CACHE_FORMAT,
            "image": str(request.path),
            "image_sha256": request.sha256,
            "transform": request.transform.key(),
            "model": self.model_id,
            "vae_fingerprint": self.fingerprint,
        }
        tensors = {"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()}
        save_safetensors_atomic(tensors, self.path_for(request.sha256, request.transform), metadata)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from the cached latent distribution, as `latent_dist.sample()` would give: [4, h, w]."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.dtype)
    return mean + std * noise


@dataclass
class CacheStats:
    total: int  # distinct entries the run needs
    reused: int  # already in the cache
    built: int  # encoded now (by this process)
    rebuilt: list[str] = field(default_factory=list)  # "path: why" of entries that were there but unusable

    def describe(self) -> str:
        line = f"{self.total} entries: {self.reused} reused, {self.built} built"
        if self.rebuilt:
            shown = "; ".join(self.rebuilt[:3]) + (
                f"; ... {len(self.rebuilt) - 3} more" if len(self.rebuilt) > 3 else ""
            )
            line += f" ({len(self.rebuilt)} damaged entr{'y' if len(self.rebuilt) == 1 else 'ies'} rebuilt: {shown})"
        return line


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="entry", disable=not enabled)


def _stop_if_requested(should_stop: Callable[[], bool] | None) -> None:
    """Between batches: honour SIGTERM / Ctrl-C; every entry written so far stays, the next build continues."""
    if should_stop is not None and should_stop():
        from loratk.core.interrupts import TrainingInterrupted

        raise TrainingInterrupted(
            "SIGTERM", "stopped while building the data caches (finished entries are kept)"
        )


def build_latent_cache(
    cache: LatentCache,
    requests: Iterable[LatentRequest],
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 4,
    max_pixels: int = MAX_PIXELS,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> CacheStats:
    """Encode every request that has no readable entry yet; check each latent is finite.

    `encode` maps pixels [B, 3, H, W] in [-1, 1] to scaled (mean, std) [B, 4, H/8, W/8]. Requests are
    grouped by bucket so a VAE batch never mixes sizes; with several processes each encodes its share.
    """
    unique: dict[str, LatentRequest] = {}
    for request in requests:
        unique.setdefault(cache.key(request.sha256, request.transform), request)
    # Shard the full, sorted key list (the same on every process) before looking at what exists: another
    # process may already be writing its share, so "what is missing" differs from one moment to the next.
    shard = sorted(unique.items())[process_index::num_processes]
    problems = {k: cache.problem(r.sha256, r.transform) for k, r in shard}
    mine = [r for k, r in shard if problems[k] is not None]
    rebuilt = [
        f"{_entry_path(cache.folder, k)}: {why}"
        for k, why in problems.items()
        if why not in (None, "missing")
    ]
    by_bucket: dict[Size, list[LatentRequest]] = {}
    for request in mine:
        by_bucket.setdefault(request.transform.bucket, []).append(request)
    with _progress(len(mine), "cache latents", progress) as bar:
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), batch_size):
                _stop_if_requested(should_stop)
                batch = group[start : start + batch_size]
                pixels = torch.stack([_render(r, max_pixels) for r in batch])
                mean, std = encode(pixels)
                for i, request in enumerate(batch):
                    if not (torch.isfinite(mean[i]).all() and torch.isfinite(std[i]).all()):
                        raise CacheError(
                            f"{request.path}: the VAE produced NaN/inf latents for this image "
                            f"({request.transform.key()}); run the VAE in fp32 or bf16 (or set model.vae to "
                            "madebyollin/sdxl-vae-fp16-fix), or remove the image"
                        )
                    cache.save(request, mean[i], std[i])
                bar.update(len(batch))
    # This process's share.
    return CacheStats(total=len(unique), reused=len(shard) - len(mine), built=len(mine), rebuilt=rebuilt)


def _render(request: LatentRequest, max_pixels: int) -> torch.Tensor:
    try:
        image = load_image(request.path, max_pixels)
    except ImageLoadError as err:
        raise CacheError(f"{err} (the file changed after the data check?)") from None
    return image_to_tensor(apply_transform(image, request.transform))


# ---------------------------------------------------------------- text embeddings


class TextEmbeddingCache:
    """The text conditioning of each exact caption text (for SDXL: both encoders' hidden states [77, D1+D2]
    and the pooled embedding [P]), one entry per caption, under the names the model family gives them."""

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: str,
        model_id: str = "",
        keys: Sequence[str] = ("prompt_embeds", "pooled_prompt_embeds"),
    ):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.keys = tuple(keys)
        self.folder = self.root / "text" / fingerprint[:24]

    def key(self, text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path_for(self, text: str) -> Path:
        return _entry_path(self.folder, self.key(text))

    def load(self, text: str) -> dict[str, torch.Tensor]:
        path = self.path_for(text)
        tensors = _load(path, f"caption {text[:60]!r}")
        _check_loaded(path, tensors, f"caption {text[:60]!r}", None)
        return {key: tensors[key] for key in self.keys}

    def problem(self, text: str) -> str | None:
        return check_entry(self.path_for(text), self.keys)

    def save(self, text: str, tensors: dict[str, torch.Tensor]) -> None:
        metadata = {
            "loratk.cache_format": CACHE_FORMAT,
            "text": text,
            "model": self.model_id,
            "text_encoders_fingerprint": self.fingerprint,
        }
        tensors = {key: tensors[key].detach().cpu().contiguous() for key in self.keys}
        save_safetensors_atomic(tensors, self.path_for(text), metadata)


def build_text_cache(
    cache: TextEmbeddingCache,
    texts: Iterable[str],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 16,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> CacheStats:
    """Encode every caption text (the empty caption included, when asked for) that has no entry yet."""
    unique = sorted(set(texts))
    shard = unique[process_index::num_processes]
    problems = {t: cache.problem(t) for t in shard}
    mine = [t for t in shard if problems[t] is not None]
    rebuilt = [f"{cache.path_for(t)}: {why}" for t, why in problems.items() if why not in (None, "missing")]
    with _progress(len(mine), "cache text embeddings", progress) as bar:
        for start in range(0, len(mine), batch_size):
            _stop_if_requested(should_stop)
            batch = mine[start : start + batch_size]
            encoded = encode(batch)
            for i, text in enumerate(batch):
                if not all(torch.isfinite(value[i]).all() for value in encoded.values()):
                    raise CacheError(
                        f"the text encoders produced NaN/inf for the caption {text[:80]!r}; "
                        "run them in fp32 or bf16 (train.mixed_precision)"
                    )
                cache.save(text, {key: value[i] for key, value in encoded.items()})
            bar.update(len(batch))
    # This process's share.
    return CacheStats(total=len(unique), reused=len(shard) - len(mine), built=len(mine), rebuilt=rebuilt)
