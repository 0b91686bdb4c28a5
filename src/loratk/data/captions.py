"""Captions: sidecar text files, `captions/<set>.jsonl` manifests and `metadata.jsonl` (the HF imagefolder
convention); trigger words and tag shuffling. Every error names the file (and line) and says how to fix it.

Precedence, per image, with `caption_source = "auto"`: the recipe's manifest, then the folder's
`metadata.jsonl`, then the sidecar `image.txt`. Any other `caption_source` uses that one source only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CAPTION_SOURCES = ("auto", "sidecar", "manifest", "metadata")
METADATA_FILE = "metadata.jsonl"


class CaptionError(ValueError):
    """A caption problem. `line` is set for manifest lines; `kind` groups problems in reports."""

    def __init__(
        self,
        path: str | os.PathLike,
        reason: str,
        fix: str,
        *,
        line: int | None = None,
        kind: str = "caption_unreadable",
    ):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        self.line = line
        self.kind = kind
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}; {fix}")


@dataclass(frozen=True)
class Subset:
    """One image folder and where its captions come from (a plain copy of a recipe subset)."""

    dir: Path
    caption_source: str = "auto"
    manifest: Path | None = None
    caption_ext: str = ".txt"
    repeats: int = 1
    trigger: str | None = None

    @property
    def name(self) -> str:
        return Path(self.dir).name or str(self.dir)


# ---------------------------------------------------------------- sidecar files


def sidecar_path(image_path: str | os.PathLike, ext: str = ".txt") -> Path:
    return Path(image_path).with_suffix(ext)


def normalise_caption(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space."""
    return " ".join(text.split())


def read_sidecar_caption(image_path: str | os.PathLike, ext: str = ".txt") -> str:
    """The caption in `image.txt` beside `image.png`, normalised; raise `CaptionError` if unusable."""
    path = sidecar_path(image_path, ext)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptionError(
            path,
            "caption file is missing",
            f"write one, or run `loratk caption {Path(image_path).parent}`",
            kind="caption_missing",
        ) from None
    except OSError as err:
        raise CaptionError(path, f"cannot read it ({err.strerror or err})", "check permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionError(
            path,
            f"not UTF-8 (bad byte 0x{data[err.start]:02x} at byte offset {err.start})",
            "re-save it as UTF-8",
            kind="caption_not_utf8",
        ) from None
    text = normalise_caption(text)
    if not text:
        raise CaptionError(
            path, "caption is empty", "write a caption into it, or remove the image", kind="caption_empty"
        )
    return text


# ---------------------------------------------------------------- manifests (captions/<set>.jsonl, metadata.jsonl)


@dataclass
class ManifestEntry:
    text: str  # normalised; may be empty (reported per image)
    line: int


@dataclass
class Manifest:
    """The entries of one JSONL caption file, keyed by image path (`root / file_name`), plus its problems."""

    path: Path
    root: Path
    entries: dict[Path, ManifestEntry] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # the valid lines as written, in order (extra keys kept)
    problems: list[CaptionError] = field(default_factory=list)  # line-level: always errors
    warnings: list[str] = field(default_factory=list)


def resolve_manifest_file_name(root: Path, file_name: str) -> Path:
    """`root / file_name`, or `ValueError` if it escapes `root` (`..`, an absolute path, or a symlink out)."""
    if not file_name:
        raise ValueError("file_name is empty")
    if (
        file_name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", file_name)
        or Path(file_name).is_absolute()
    ):
        raise ValueError(f"file_name {file_name!r} is an absolute path")
    parts = re.split(r"[\\/]", file_name)
    if ".." in parts:
        raise ValueError(f"file_name {file_name!r} climbs out of the folder with '..'")
    path = Path(os.path.normpath(root / file_name))
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"file_name {file_name!r} is a symlink to {real}, outside the image folder")
    return path


def read_manifest(path: str | os.PathLike, root: str | os.PathLike) -> Manifest:
    """Read a JSONL caption file (`{"file_name": ..., "text": ...}` per line, paths relative to `root`).

    Every malformed line, missing field, escaping path and duplicate is collected with its line number.
    """
    path, root = Path(path), Path(root)
    manifest = Manifest(path=path, root=root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        manifest.problems.append(
            CaptionError(
                path,
                "caption manifest not found",
                "check the path (it is relative to where you run), or run `loratk caption` to write it",
                kind="manifest",
            )
        )
        return manifest
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line_start, offset = offset, offset + len(raw) + 1
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw, line_start = raw[3:], line_start + 3
        if not raw.strip():
            continue

        def problem(reason: str, fix: str, line: int = number) -> None:
            manifest.problems.append(CaptionError(path, reason, fix, line=line, kind="manifest"))

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problem(
                f"not UTF-8 (bad byte 0x{raw[err.start]:02x} at byte offset {line_start + err.start})",
                "re-save the file as UTF-8",
            )
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problem(
                f"not valid JSON ({err.msg} at column {err.colno})", 'write {"file_name": ..., "text": ...}'
            )
            continue
        if not isinstance(row, dict):
            problem(
                f"expected a JSON object, got {type(row).__name__}", 'write {"file_name": ..., "text": ...}'
            )
            continue
        missing = [key for key in ("file_name", "text") if key not in row]
        if missing:
            problem(f"lacks the field(s) {', '.join(missing)}", 'every line needs "file_name" and "text"')
            continue
        file_name, caption = row["file_name"], row["text"]
        if not isinstance(file_name, str) or not isinstance(caption, str):
            problem("file_name and text must be strings", 'write {"file_name": "a.png", "text": "..."}')
            continue
        try:
            image_path = resolve_manifest_file_name(root, file_name)
        except ValueError as err:
            problem(f"{err}; rejected", f"name a file inside {root} with a relative path")
            continue
        if image_path in manifest.entries:
            first = manifest.entries[image_path].line
            problem(f"{file_name!r} already has a caption on line {first}", "keep one line per image")
            continue
        manifest.entries[image_path] = ManifestEntry(normalise_caption(caption), number)
        manifest.rows.append(row)
    for image_path, entry in manifest.entries.items():
        if not image_path.is_file():
            manifest.warnings.append(
                f"{path}:{entry.line}: names {image_path}, which does not exist; entry unused"
            )
    return manifest


def read_metadata_jsonl(folder: str | os.PathLike) -> Manifest | None:
    """The folder's `metadata.jsonl` (HF imagefolder convention), or None if it has none.

    Lines are validated here (line numbers, escapes); a clean file is then read with `datasets`' own
    imagefolder loader, so captions mean exactly what they mean to Hugging Face tools.
    """
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    manifest = read_manifest(path, folder)
    if manifest.problems or not manifest.entries:
        return manifest
    try:
        rows = _load_imagefolder_captions(folder)
    except Exception as err:  # datasets' errors are not ours to crash on: report them
        manifest.problems.append(
            CaptionError(path, f"datasets could not read it ({err})", "fix the file", kind="manifest")
        )
        return manifest
    lines = {p: e.line for p, e in manifest.entries.items()}
    manifest.entries = {
        p: ManifestEntry(normalise_caption(text), lines.get(p, 0)) for p, text in rows.items() if p in lines
    }
    return manifest


def _load_imagefolder_captions(folder: Path) -> dict[Path, str]:
    import shutil
    import tempfile

    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    cache = tempfile.mkdtemp(prefix="loratk-metadata-")
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache)
        table = table.cast_column("image", datasets.Image(decode=False))
        real_root = Path(os.path.realpath(folder))
        out: dict[Path, str] = {}
        for row in table:
            # datasets gives absolute paths; name them the way the folder listing does.
            absolute = Path(os.path.normpath(row["image"]["path"]))
            try:
                rel = absolute.relative_to(real_root)
            except ValueError:
                rel = absolute.relative_to(Path(os.path.abspath(folder)))
            out[Path(os.path.normpath(folder / rel))] = row["text"]
        return out
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- per-image resolution


@dataclass
class CaptionResult:
    text: str | None  # None when `error` is set
    source: str  # "manifest" | "metadata" | "sidecar" | "" (none found)
    error: CaptionError | None = None


def _entry_result(manifest: Manifest, image: Path, source: str) -> CaptionResult:
    entry = manifest.entries[image]
    if not entry.text:
        error = CaptionError(
            manifest.path,
            f"caption for {image.name} is empty",
            "write a caption on that line",
            line=entry.line,
            kind="caption_empty",
        )
        return CaptionResult(None, source, error)
    return CaptionResult(entry.text, source)


def resolve_captions(
    subset: Subset,
    images: Sequence[Path],
    manifest: Manifest | None,
    metadata: Manifest | None,
) -> tuple[dict[Path, CaptionResult], list[str]]:
    """The caption of every image by the subset's precedence, and notes (e.g. shadowed sidecars)."""
    results: dict[Path, CaptionResult] = {}
    shadowed = 0
    for image in images:
        sidecar = sidecar_path(image, subset.caption_ext)
        order = {
            "auto": ("manifest", "metadata", "sidecar"),
            "manifest": ("manifest",),
            "metadata": ("metadata",),
            "sidecar": ("sidecar",),
        }[subset.caption_source]
        result = None
        for source in order:
            if source == "manifest" and manifest is not None and image in manifest.entries:
                result = _entry_result(manifest, image, "manifest")
            elif source == "metadata" and metadata is not None and image in metadata.entries:
                result = _entry_result(metadata, image, "metadata")
            elif source == "sidecar" and (subset.caption_source == "sidecar" or sidecar.exists()):
                try:
                    result = CaptionResult(read_sidecar_caption(image, subset.caption_ext), "sidecar")
                except CaptionError as err:
                    result = CaptionResult(None, "sidecar", err)
            if result is not None:
                break
        if result is None:
            result = CaptionResult(None, "", _missing_caption(subset, image, manifest, metadata))
        elif result.source != "sidecar" and sidecar.exists():
            shadowed += 1
        results[image] = result
    notes = []
    if shadowed:
        winner = "the manifest or metadata.jsonl"
        notes.append(
            f"{subset.dir}: {shadowed} sidecar {subset.caption_ext} caption(s) are not used because "
            f"{winner} has a caption for the same image (precedence: manifest > metadata.jsonl > sidecar)"
        )
    return results, notes


def _missing_caption(
    subset: Subset, image: Path, manifest: Manifest | None, metadata: Manifest | None
) -> CaptionError:
    looked = []
    if subset.caption_source in ("auto", "manifest") and subset.manifest is not None:
        looked.append(f"not in {subset.manifest}")
    if subset.caption_source in ("auto", "metadata"):
        looked.append(f"not in {METADATA_FILE}" if metadata is not None else f"no {METADATA_FILE}")
    if subset.caption_source in ("auto", "sidecar"):
        looked.append(f"no {sidecar_path(image, subset.caption_ext).name}")
    where = sidecar_path(image, subset.caption_ext) if subset.caption_source in ("auto", "sidecar") else image
    return CaptionError(
        where,
        f"caption file is missing ({', '.join(looked)})" if looked else "caption is missing",
        f"write one, or run `loratk caption {subset.dir}`",
        kind="caption_missing",
    )
