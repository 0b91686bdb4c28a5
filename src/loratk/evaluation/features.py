"""Features of image files (the training images), computed once per evaluator and per image content.

Every epoch of every run compares its samples with the same real images, so their features are stored in
`<cache>/eval-features/`: one safetensors file per evaluator (named by its digest), one row per image
content (keyed by the sha256 of the file's bytes). An edited image gets a new key and is recomputed; a
different model or preprocessing gets a different file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from loratk.data.images import decode_image, read_image_bytes
from loratk.evaluation.evaluators import PREPROCESSING_VERSION, Evaluator
from loratk.files import default_cache_dir, load_safetensors, save_safetensors_atomic

# Bump when the layout of the cache files changes; old files are then ignored (and left for `rm -r`).
FEATURE_CACHE_VERSION = "1"


def default_feature_cache_dir() -> Path:
    """`<cache>/eval-features` (see `files.default_cache_dir`)."""
    return default_cache_dir() / "eval-features"


def hash_file(path: Path) -> str:
    """sha256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """Stored features of image files, per evaluator. Images are decoded like training images: full decode,
    EXIF orientation, every mode to 8-bit RGB (transparency onto white)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_feature_cache_dir()

    def path_for(self, evaluator: Evaluator) -> Path:
        """The cache file of `evaluator`: its kind and a hash of its digest and the cache versions."""
        key = f"{evaluator.digest}\0{PREPROCESSING_VERSION}\0{FEATURE_CACHE_VERSION}"
        return self.folder / f"{evaluator.kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def image_features(self, evaluator: Evaluator, paths: Sequence[str | os.PathLike]) -> Tensor:
        """float32 [N, D], row i for `paths[i]`; only images not in the cache go through the model."""
        return self._lookup(evaluator, paths)[0]

    def features_and_logits(
        self, evaluator: Evaluator, paths: Sequence[str | os.PathLike]
    ) -> tuple[Tensor, Tensor]:
        """Inception's pool features [N, D] and logits [N, K] for `paths`, cached together."""
        if not hasattr(evaluator, "features_and_logits"):
            raise TypeError(
                f"eval.{evaluator.kind}: {evaluator.name!r} gives no logits (only Inception does)"
            )
        features, logits = self._lookup(evaluator, paths)
        return features, logits

    def _load(self, path: Path, evaluator: Evaluator) -> dict[str, Tensor]:
        """The stored rows, or none when the file is missing, unreadable or from another evaluator."""
        if not path.is_file():
            return {}
        try:
            tensors, metadata = load_safetensors(path)
        except ValueError:  # a damaged cache file is only a lost cache: recompute and overwrite it
            return {}
        return tensors if metadata.get("digest") == evaluator.digest else {}

    def _lookup(self, evaluator: Evaluator, paths: Sequence[str | os.PathLike]) -> tuple[Tensor, ...]:
        paths = [Path(p) for p in paths]
        with_logits = hasattr(evaluator, "features_and_logits")
        names = ("features", "logits") if with_logits else ("features",)
        if not paths:  # the evaluator knows the empty shapes
            return evaluator.features_and_logits([]) if with_logits else (evaluator.image_features([]),)
        store_path = self.path_for(evaluator)
        stored = self._load(store_path, evaluator)
        keys = [hash_file(p) for p in paths]
        missing = [i for i, key in enumerate(keys) if f"features.{key}" not in stored]
        for start in range(0, len(missing), evaluator.batch_size):
            # Decode one batch at a time: a few thousand decoded photos would not fit in memory at once.
            chunk = missing[start : start + evaluator.batch_size]
            images, chunk_keys = [], []
            for i in chunk:
                data = read_image_bytes(paths[i])
                chunk_keys.append(
                    hashlib.sha256(data).hexdigest()
                )  # the content decoded, even if just edited
                images.append(decode_image(data, paths[i]).image)
            outputs = (
                evaluator.features_and_logits(images) if with_logits else (evaluator.image_features(images),)
            )
            for i, key, *rows in zip(chunk, chunk_keys, *outputs, strict=True):
                keys[i] = key
                for name, row in zip(names, rows, strict=True):
                    stored[f"{name}.{key}"] = row.float().contiguous()
        if missing:
            metadata = {
                "evaluator": evaluator.name,
                "kind": evaluator.kind,
                "digest": evaluator.digest,
                "preprocessing": PREPROCESSING_VERSION,
                "version": FEATURE_CACHE_VERSION,
            }
            save_safetensors_atomic(stored, store_path, metadata)
        return tuple(torch.stack([stored[f"{name}.{key}"] for key in keys]) for name in names)
