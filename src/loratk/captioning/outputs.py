"""Where captions go and what is there already: sidecar `.txt` files and the manifest (read with the one
manifest reader, `data.captions.read_manifest`), planned per image and written atomically after each batch."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loratk.data.captions import CaptionError, read_manifest, read_sidecar_caption, sidecar_path
from loratk.files import atomic_write_text

OUTPUTS = ("sidecar", "manifest", "both")


class CaptioningError(ValueError):
    """A problem with the arguments, the folder, the manifest or the model: nothing was captioned."""


@dataclass(frozen=True)
class Captioned:
    path: Path
    text: str  # the caption as written, prefix and suffix included


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class CaptionReport:
    folder: Path
    captioned: list[Captioned] = field(default_factory=list)
    copied: list[Captioned] = field(default_factory=list)  # written from its caption on the other side
    skipped: list[Skipped] = field(default_factory=list)  # already had a caption
    failed: list[Skipped] = field(default_factory=list)  # unreadable image, caption-file clash ...
    manifest: Path | None = None
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.captioned) / self.seconds if self.seconds > 0 else 0.0


def manifest_path(folder: Path, manifest_dir: str | os.PathLike = "captions") -> Path:
    return Path(manifest_dir) / f"{folder.resolve().name}.jsonl"


def read_manifest_rows(path: Path, folder: Path) -> list[dict]:
    """The manifest's lines as written, in file order ([] before it exists); any bad line stops the run
    with every problem listed, its line number and the fix, and the manifest left untouched."""
    if not path.exists():
        return []
    manifest = read_manifest(path, folder)
    if manifest.problems:
        listed = "\n".join(f"  {p}" for p in manifest.problems)
        raise CaptioningError(
            f"{len(manifest.problems)} problem(s) in the manifest, which is left untouched:\n{listed}"
        )
    return manifest.rows


def write_manifest(path: Path, entries: Sequence[dict]) -> None:
    """Rewrite the whole manifest under a temp name and rename it: a kill never leaves a half line."""
    atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def update_manifest(path: Path, folder: Path, captions: dict[str, str], overwrite: bool) -> set[str]:
    """Merge `captions` (file_name -> text) into the manifest as it is on disk now; return the names kept.

    Reading it again each time keeps edits made while a run goes on: an existing non-empty entry is
    replaced only with `overwrite`. New entries are appended, existing ones keep their place and extra keys.
    """
    entries = read_manifest_rows(path, folder)
    index = {e["file_name"]: e for e in entries}
    kept = set()
    for name, text in captions.items():
        entry = index.get(name)
        if entry is None:
            entries.append({"file_name": name, "text": text})
        elif overwrite or not entry["text"].strip():
            entry["text"] = text
        else:
            kept.add(name)
    write_manifest(path, entries)
    return kept


def _has_sidecar(image: Path) -> bool:
    """A sidecar counts as a caption unless it is empty or blank (replacing those loses nothing)."""
    caption = sidecar_path(image)
    try:
        return bool(caption.read_bytes().removeprefix(b"\xef\xbb\xbf").strip())
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there but unreadable: never replace what we cannot read


@dataclass
class _Plan:
    todo: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Skipped] = field(default_factory=list)
    copy_to_manifest: dict[str, str] = field(default_factory=dict)
    copy_to_sidecar: dict[Path, str] = field(default_factory=dict)


def plan_captions(
    folder: Path, images: Sequence[Path], manifest: dict[str, str], output: str, overwrite: bool
) -> _Plan:
    """Decide per image: caption it, skip it (it has a caption), or fail it (its sidecar name clashes).

    With `both`, an image captioned on one side only is not run again: its caption is copied to the other.
    """
    plan = _Plan()
    sidecars = output in ("sidecar", "both")
    by_sidecar: dict[Path, list[Path]] = {}
    for image in images:
        by_sidecar.setdefault(sidecar_path(image), []).append(image)
    for image in images:
        name = image.relative_to(folder).as_posix()
        clash = by_sidecar[sidecar_path(image)]
        if sidecars and len(clash) > 1:
            others = ", ".join(p.name for p in clash if p != image)
            plan.failed.append(
                Skipped(
                    image,
                    f"shares its caption file {sidecar_path(image).name} with {others}; rename one of them",
                )
            )
            continue
        if overwrite:
            plan.todo.append(image)
            continue
        in_sidecar = sidecars and _has_sidecar(image)
        in_manifest = output != "sidecar" and bool(manifest.get(name, "").strip())
        if output == "sidecar" and in_sidecar:
            plan.skipped.append(Skipped(image, f"already has {sidecar_path(image).name}"))
        elif output == "manifest" and in_manifest:
            plan.skipped.append(Skipped(image, "already in the manifest"))
        elif output == "both" and in_sidecar and in_manifest:
            plan.skipped.append(
                Skipped(image, f"already has {sidecar_path(image).name} and a manifest entry")
            )
        elif output == "both" and in_sidecar:
            try:
                plan.copy_to_manifest[name] = read_sidecar_caption(image)
            except CaptionError as err:
                plan.failed.append(Skipped(image, f"{err.reason}; {err.fix}"))
                continue
        elif output == "both" and in_manifest:
            plan.copy_to_sidecar[image] = manifest[name]
        else:
            plan.todo.append(image)
    return plan


def write_batch(
    report: CaptionReport,
    images: Sequence[Path],
    names: Sequence[str],
    texts: Sequence[str],
    prefix: str,
    suffix: str,
    output: str,
    manifest: Path | None,
    overwrite: bool,
) -> None:
    """Sidecars first, then one manifest rewrite: each file is whole, and a rerun fills any gap.

    Without `overwrite`, a caption that appeared since the run planned (typed by hand meanwhile) is kept.
    """
    done: dict[str, tuple[Path, str]] = {}
    for image, name, text in zip(images, names, texts, strict=True):
        if not text:
            report.failed.append(
                Skipped(image, "the model gave an empty caption; try other decoding settings")
            )
            continue
        caption = f"{prefix}{text}{suffix}"
        if output in ("sidecar", "both"):
            if not overwrite and _has_sidecar(image):
                report.skipped.append(Skipped(image, "a caption file appeared while running; kept it"))
                continue
            atomic_write_text(sidecar_path(image), caption + "\n")
        done[name] = (image, caption)
    kept = set()
    if manifest is not None and done:
        kept = update_manifest(
            manifest, report.folder, {n: c for n, (_, c) in done.items()}, overwrite=overwrite
        )
    for name, (image, caption) in done.items():
        if name in kept:
            report.skipped.append(Skipped(image, "a manifest entry appeared while running; kept it"))
        else:
            report.captioned.append(Captioned(image, caption))
