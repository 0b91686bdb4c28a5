"""The data preflight: decode every image, read every caption, assign buckets, find near-duplicates.

Used by `loratk check` and by training before any model loads. Loads no model. What the report looks like
(summary, CSV, quarantine) is in `check_report`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from loratk.data.buckets import Size, assign_bucket, compute_buckets
from loratk.data.captions import (
    METADATA_FILE,
    Manifest,
    Subset,
    read_manifest,
    read_metadata_jsonl,
    resolve_captions,
)
from loratk.data.images import (
    IMAGE_EXTENSIONS,
    KIND_LABELS,
    MAX_PIXELS,
    ImageLoadError,
    check_min_side,
    decode_image,
    list_image_files,
    read_image_bytes,
    sniff_image_format,
)
from loratk.data.tags import apply_trigger_word

_TEXT_EXTENSIONS = {".txt", ".caption", ".json", ".jsonl", ".csv", ".md", ".toml", ".yaml", ".yml", ".npz"}


@dataclass(frozen=True)
class DataSpec:
    """What the preflight checks (plain values, so this module never imports the recipe)."""

    subsets: tuple[Subset, ...]
    resolution: Size = (1024, 1024)  # (width, height); its area is the bucket area
    buckets: bool = True
    bucket_step: int = 64
    bucket_min_side: int | None = None
    bucket_max_side: int | None = None
    bucket_no_upscale: bool = False
    min_side: int | None = None  # None: a quarter of the shorter training side
    max_pixels: int = MAX_PIXELS

    @property
    def effective_min_side(self) -> int:
        return self.min_side if self.min_side is not None else max(1, min(self.resolution) // 4)

    def bucket_list(self) -> list[Size]:
        if not self.buckets:
            return [self.resolution]
        return compute_buckets(
            self.resolution,
            step=self.bucket_step,
            min_side=self.bucket_min_side,
            max_side=self.bucket_max_side,
        )

    def assign(self, size: Size, buckets: Sequence[Size]) -> Size:
        if not self.buckets:
            return self.resolution
        return assign_bucket(size, buckets, no_upscale=self.bucket_no_upscale, step=self.bucket_step)


@dataclass
class Problem:
    kind: str
    message: str  # "<file>[:line]: what is wrong; what to do"


@dataclass
class ImageReport:
    path: Path
    subset: str  # the folder, as the recipe names it
    subset_index: int = 0  # position in DataSpec.subsets (two subsets may share a folder)
    width: int | None = None
    height: int | None = None
    format: str = ""
    sha256: str = ""
    phash: int | None = None
    caption: str | None = None
    caption_source: str = ""
    bucket: Size | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    near_duplicate_of: str = ""
    moved_to: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def size(self) -> Size | None:
        return (self.width, self.height) if self.width is not None and self.height is not None else None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"


@dataclass
class DataReport:
    spec: DataSpec
    images: list[ImageReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # dataset-level (folders, manifests): never skippable
    warnings: list[str] = field(default_factory=list)
    duplicates: list[list[ImageReport]] = field(default_factory=list)
    buckets: list[Size] = field(default_factory=list)  # the generated bucket list

    @property
    def good(self) -> list[ImageReport]:
        return [r for r in self.images if r.ok]

    @property
    def bad(self) -> list[ImageReport]:
        return [r for r in self.images if not r.ok]

    @property
    def error_lines(self) -> list[str]:
        return self.problems + [p.message for r in self.bad for p in r.problems]

    @property
    def has_errors(self) -> bool:
        return bool(self.problems or self.bad)


# ---------------------------------------------------------------- perceptual hash


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)


def compute_perceptual_hash(image: Image.Image) -> int | None:
    """64-bit pHash: 32x32 grey, 2-D DCT, the 8x8 lowest frequencies against their median (DC excluded).

    None for an (almost) flat image: its hash bits would be noise, matching every other flat image.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    if grey.std() < 2.0:
        return None
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def find_near_duplicates(hashes: Sequence[int], max_distance: int) -> list[list[int]]:
    """Groups (indices) of hashes within `max_distance` bits of each other (single linkage), biggest first."""
    n = len(hashes)
    if n < 2:
        return []
    values = np.array(hashes, dtype=np.uint64)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 512):
        block = values[start : start + 512, None] ^ values[None, :]
        close = np.argwhere(np.bitwise_count(block) <= max_distance)
        for a, b in close:
            a, b = int(a) + start, int(b)
            if a < b:
                parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def similarity(a: ImageReport, b: ImageReport) -> str:
    if a.sha256 == b.sha256:
        return "identical bytes"
    if a.phash is not None and b.phash is not None:
        return f"distance {hamming(a.phash, b.phash)}"
    return "same group"


# ---------------------------------------------------------------- the preflight


def _list_images(subset: Subset, manifests: Sequence[Manifest]) -> tuple[list[Path], list[str]]:
    """Image files directly in the folder, plus any existing file a manifest names; and ignored look-alikes."""
    folder = Path(subset.dir)
    images, warnings = list_image_files(folder), []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if (
            suffix not in IMAGE_EXTENSIONS
            and suffix not in _TEXT_EXTENSIONS
            and suffix != subset.caption_ext
            and path.name != METADATA_FILE
        ):
            fmt = sniff_image_format(path)
            if fmt is not None:
                warnings.append(
                    f"{path}: ignored: the content is a {fmt} image but the extension {suffix or '(none)'!r} is "
                    f"not an image extension; rename it (e.g. {path.stem}.{fmt.lower()}) to train on it"
                )
    listed = set(images)
    for manifest in manifests:
        for path in manifest.entries:
            if path not in listed and path.is_file():
                images.append(path)
                listed.add(path)
    return images, warnings


def _inspect(path: Path, subset: str, spec: DataSpec, perceptual_hash: bool) -> ImageReport:
    report = ImageReport(path=path, subset=subset)
    try:
        data = read_image_bytes(path)
        report.sha256 = hashlib.sha256(data).hexdigest()
        decoded = decode_image(data, path, spec.max_pixels)
        report.format = decoded.format
        report.width, report.height = decoded.image.size
        report.notes.extend(f"{path}: {note}" for note in decoded.notes)
        check_min_side(path, decoded.image.size, spec.effective_min_side)
        if perceptual_hash:
            report.phash = compute_perceptual_hash(decoded.image)
    except ImageLoadError as err:
        report.problems.append(Problem(err.kind, str(err)))
    return report


def run_preflight(
    spec: DataSpec,
    *,
    perceptual_hash: bool = False,
    max_distance: int = 6,
    workers: int | None = None,
    progress: bool = False,
) -> DataReport:
    """Check every subset: folders, manifests, images (full decode), captions, buckets, near-duplicates."""
    report = DataReport(spec=spec)
    try:
        report.buckets = spec.bucket_list()
    except ValueError as err:
        report.problems.append(
            f"data buckets: {err}; adjust data.bucket_min_side / bucket_max_side / bucket_step"
        )
        return report
    jobs: list[tuple[Path, str]] = []
    plans: list[tuple[int, Subset, list[Path], Manifest | None, Manifest | None]] = []
    for subset_index, subset in enumerate(spec.subsets):
        folder = Path(subset.dir)
        if not folder.is_dir():
            report.problems.append(
                f"{folder}: image folder not found; set data.dir (or the subset's dir) to a folder"
            )
            continue
        manifest = read_manifest(subset.manifest, folder) if subset.manifest is not None else None
        metadata = read_metadata_jsonl(folder) if subset.caption_source in ("auto", "metadata") else None
        if subset.caption_source == "metadata" and metadata is None:
            report.problems.append(
                f"{folder / METADATA_FILE}: not found, but caption_source = 'metadata'; write it or change caption_source"
            )
        for source in (manifest, metadata):
            if source is not None:
                report.problems.extend(str(p) for p in source.problems)
                report.warnings.extend(source.warnings)
        images, ignored = _list_images(subset, [m for m in (manifest, metadata) if m is not None])
        report.warnings.extend(ignored)
        if not images:
            report.problems.append(
                f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}); put training images there"
            )
            continue
        plans.append((subset_index, subset, images, manifest, metadata))
        jobs.extend((path, str(subset.dir)) for path in images)

    workers = workers or min(8, os.cpu_count() or 1)
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: _inspect(job[0], job[1], spec, perceptual_hash), jobs)
        inspected = list(
            tqdm(results, total=len(jobs), desc="check images", unit="img", disable=not progress)
        )

    # Two subsets may share a folder (e.g. two manifests over one set of images): each gets its own reports.
    position = 0

    for subset_index, subset, images, manifest, metadata in plans:
        captions, notes = resolve_captions(subset, images, manifest, metadata)
        report.warnings.extend(notes)
        for path in images:
            image, position = inspected[position], position + 1
            image.subset_index = subset_index
            result = captions[path]
            image.caption_source = result.source
            if result.error is not None:
                image.problems.append(Problem(result.error.kind, str(result.error)))
            else:
                image.caption = apply_trigger_word(result.text or "", subset.trigger)
            if image.size is not None and not any(p.kind in KIND_LABELS for p in image.problems):
                image.bucket = spec.assign(image.size, report.buckets)
            report.images.append(image)

    if perceptual_hash:
        report.duplicates = _group_duplicates(report.images, max_distance)
        for members in report.duplicates:
            for other in members[1:]:
                other.near_duplicate_of = str(members[0].path)
    for image in report.images:
        report.warnings.extend(image.notes)
    return report


def _group_duplicates(images: Sequence[ImageReport], max_distance: int) -> list[list[ImageReport]]:
    """Near-duplicates by perceptual hash, merged with exact duplicates (same bytes), biggest groups first."""
    decoded = [r for r in images if r.sha256]
    hashed = [i for i, r in enumerate(decoded) if r.phash is not None]
    parent = list(range(len(decoded)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in find_near_duplicates([decoded[i].phash for i in hashed], max_distance):
        for member in group[1:]:
            parent[root(hashed[member])] = root(hashed[group[0]])
    first_with: dict[str, int] = {}
    for i, image in enumerate(decoded):
        parent[root(i)] = root(first_with.setdefault(image.sha256, i))
    groups: dict[int, list[ImageReport]] = {}
    for i, image in enumerate(decoded):
        groups.setdefault(root(i), []).append(image)
    # The largest image of a group comes first: it is the one worth keeping.
    ordered = [
        sorted(g, key=lambda r: (-(r.width or 0) * (r.height or 0), str(r.path))) for g in groups.values()
    ]
    return sorted((g for g in ordered if len(g) > 1), key=lambda g: (-len(g), str(g[0].path)))
