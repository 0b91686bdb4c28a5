"""The preflight's report for people: a plain-text summary, a per-image CSV, and moving bad images away."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loratk.data.buckets import count_buckets
from loratk.data.check import DataReport, ImageReport, similarity
from loratk.data.images import KIND_LABELS

CAPTION_KIND_LABELS = {
    "caption_missing": "caption missing",
    "caption_empty": "caption empty or whitespace",
    "caption_not_utf8": "caption not UTF-8",
    "caption_unreadable": "caption unreadable",
}


def drop_caption_problems(report: DataReport) -> None:
    """For data whose captions are not read (the GAN baselines): a missing or bad caption is no problem."""
    for image in report.images:
        image.problems = [p for p in image.problems if p.kind not in CAPTION_KIND_LABELS]


# Files that are expected beside images and never sniffed for image content.
REPORT_COLUMNS = (
    "path",
    "subset",
    "status",
    "kind",
    "problem",
    "width",
    "height",
    "format",
    "bucket",
    "caption_source",
    "caption",
    "sha256",
    "phash",
    "near_duplicate_of",
    "notes",
    "moved_to",
)


def _problem_kind_counts(report: DataReport) -> tuple[Counter, Counter]:
    images, captions = Counter(), Counter()
    for image in report.images:
        for problem in image.problems:
            if problem.kind in KIND_LABELS:
                images[problem.kind] += 1
            else:
                captions[problem.kind] += 1
    return images, captions


def format_summary(
    report: DataReport, *, csv_path: Path | None = None, max_lines: int = 50, quarantined: bool = False
) -> str:
    """A plain-text report: counts, bad images by reason, captions, bucket histogram, duplicates, problems."""
    spec = report.spec
    lines: list[str] = []
    total = len(report.images)
    lines.append(f"loratk check: {len(spec.subsets)} folder(s), {total} image(s)")
    for subset in spec.subsets:
        members = [r for r in report.images if r.subset == str(subset.dir)]
        ok = sum(r.ok for r in members)
        lines.append(
            f"  {subset.dir}  ({len(members)} images, {ok} ok, captions: {subset.caption_source}"
            + (f", manifest {subset.manifest}" if subset.manifest else "")
            + (f", trigger {subset.trigger!r}" if subset.trigger else "")
            + (f", repeats {subset.repeats}" if subset.repeats != 1 else "")
            + ")"
        )
    image_kinds, caption_kinds = _problem_kind_counts(report)
    width = 34
    lines.append("")
    lines.append("Images")
    lines.append(f"  {'ok (image and caption)':<{width}}{len(report.good):>6}")
    lines.append(f"  {'with problems':<{width}}{len(report.bad):>6}")
    for kind, label in KIND_LABELS.items():
        if image_kinds[kind]:
            lines.append(f"  {'bad: ' + label:<{width}}{image_kinds[kind]:>6}")
    sources = Counter(r.caption_source for r in report.images if r.caption is not None)
    lines.append("Captions")
    lines.append(
        f"  {'from manifest / metadata / sidecar':<{width}}"
        f"{sources['manifest']:>6} / {sources['metadata']} / {sources['sidecar']}"
    )
    for kind, label in CAPTION_KIND_LABELS.items():
        lines.append(f"  {label:<{width}}{caption_kinds[kind]:>6}")
    extra = sum(n for k, n in caption_kinds.items() if k not in CAPTION_KIND_LABELS)
    if extra:
        lines.append(f"  {'other caption problems':<{width}}{extra:>6}")

    assigned = [r.bucket for r in report.good if r.bucket is not None]  # the images that would train
    mode = (
        f"{len(report.buckets)} bucket(s), area {spec.resolution[0]}x{spec.resolution[1]}, step {spec.bucket_step}"
        + (", no upscale" if spec.bucket_no_upscale else "")
        if spec.buckets
        else f"buckets off: every image is resized and cropped to {spec.resolution[0]}x{spec.resolution[1]}"
    )
    lines.append(f"Buckets of the usable images ({mode})")
    histogram = count_buckets(assigned)
    peak = max((n for _, n in histogram), default=1)
    for (w, h), n in histogram:
        bar = "#" * max(1, round(24 * n / peak))
        lines.append(f"  {f'{w}x{h}':<11} {w / h:>5.2f}  {n:>5}  {bar}")
    if not histogram:
        lines.append("  (no usable image)")
    if report.duplicates:
        lines.append(f"Near-duplicates (perceptual hash; largest first): {len(report.duplicates)} group(s)")
        for group in report.duplicates[:max_lines]:
            first = group[0]
            rest = ", ".join(f"{r.path} ({similarity(first, r)})" for r in group[1:])
            lines.append(f"  {first.path} ~ {rest}")
    errors = report.error_lines
    if errors:
        lines.append(f"Errors ({len(errors)})")
        lines.extend(f"  {e}" for e in errors[:max_lines])
        if len(errors) > max_lines:
            lines.append(f"  ... {len(errors) - max_lines} more in the CSV report")
    if report.warnings:
        lines.append(f"Warnings ({len(report.warnings)})")
        lines.extend(f"  {w}" for w in report.warnings[:max_lines])
        if len(report.warnings) > max_lines:
            lines.append(f"  ... {len(report.warnings) - max_lines} more")
    if csv_path is not None:
        lines.append(f"Report: {csv_path}")
    if errors and quarantined:
        lines.append(f"Result: {len(errors)} error(s) found; the bad images were moved (see below).")
    elif errors:
        lines.append(
            f"Result: {len(errors)} error(s). Fix them, move bad files away with --quarantine DIR, "
            'or train with data.on_bad_image = "skip".'
        )
    else:
        lines.append("Result: no errors.")
    return "\n".join(lines)


def _row(image: ImageReport) -> dict[str, str]:
    return {
        "path": str(image.path),
        "subset": image.subset,
        "status": image.status,
        "kind": ";".join(p.kind for p in image.problems),
        "problem": " | ".join(p.message for p in image.problems),
        "width": "" if image.width is None else str(image.width),
        "height": "" if image.height is None else str(image.height),
        "format": image.format,
        "bucket": f"{image.bucket[0]}x{image.bucket[1]}" if image.bucket else "",
        "caption_source": image.caption_source,
        "caption": image.caption or "",
        "sha256": image.sha256,
        "phash": f"{image.phash:016x}" if image.phash is not None else "",
        "near_duplicate_of": image.near_duplicate_of,
        "notes": " | ".join(image.notes),
        "moved_to": image.moved_to,
    }


def render_csv(images: Sequence[ImageReport], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for image in images:
        writer.writerow(_row(image))
    return buffer.getvalue()


def write_report_csv(
    images: Sequence[ImageReport], path: Path, columns: Sequence[str] = REPORT_COLUMNS
) -> None:
    from loratk.files import atomic_write_text

    atomic_write_text(path, render_csv(images, columns))


SKIPPED_COLUMNS = ("path", "subset", "kind", "problem")


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    for n in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{path}: too many files with this name already; empty the quarantine folder")


def quarantine_bad_images(report: DataReport, destination: Path) -> list[tuple[Path, Path]]:
    """Move every image with a problem (and its sidecar caption) under `destination`; never delete anything.

    Files keep their path relative to their image folder, under a folder named after it; a name already
    taken in `destination` gets a `-N` suffix instead of being overwritten.
    """
    moved: list[tuple[Path, Path]] = []
    subsets = {str(s.dir): s for s in report.spec.subsets}
    for image in report.bad:
        if not image.path.exists():
            continue
        subset = subsets[image.subset]
        rel = Path(os.path.relpath(image.path, subset.dir))
        target = _free_name(destination / Path(subset.dir).name / rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(image.path), str(target))
        moved.append((image.path, target))
        image.moved_to = str(target)
        sidecar = image.path.with_suffix(subset.caption_ext)
        if sidecar.is_file():
            sidecar_target = _free_name(target.with_suffix(subset.caption_ext))
            shutil.move(str(sidecar), str(sidecar_target))
            moved.append((sidecar, sidecar_target))
    return moved
