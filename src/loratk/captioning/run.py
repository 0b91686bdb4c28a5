"""`caption_images`: caption every image of a folder that has no caption yet, batch by batch, with the
next batches decoded in threads meanwhile; resumable, and a caption is only replaced with `overwrite`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from loratk.captioning.blip import (
    DEFAULT_MODEL,
    generate_captions,
    load_blip,
    resolve_device,
    resolve_dtype,
    validate_options,
)
from loratk.captioning.outputs import (
    Captioned,
    CaptioningError,
    CaptionReport,
    Skipped,
    manifest_path,
    plan_captions,
    read_manifest_rows,
    update_manifest,
    write_batch,
)
from loratk.data.captions import sidecar_path
from loratk.data.images import IMAGE_EXTENSIONS, ImageLoadError, list_image_files, load_image
from loratk.files import atomic_write_text

logger = logging.getLogger(__name__)  # a single-process command: no Accelerate state to log through


class CaptioningInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `report` holds what was finished (and is on disk)."""

    def __init__(self, report: CaptionReport):
        super().__init__("captioning interrupted")
        self.report = report


@dataclass
class _Batch:
    images: list[Path]  # the ones that loaded, in order
    pixel_values: torch.Tensor | None  # [B, 3, S, S], S = the processor's size (384 for BLIP)
    failed: list[Skipped]


def _prepare_image(path: Path, processor: Any) -> torch.Tensor | Skipped:
    """Decode one image the way training does (EXIF, modes, size cap) and preprocess it: [3, S, S]."""
    try:
        image = load_image(path)
    except ImageLoadError as err:
        return Skipped(path, f"{err.reason}; {err.fix}")
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _prefetched(
    chunks: Sequence[Sequence[Path]], prepare: Callable[[Path], torch.Tensor | Skipped], lookahead: int = 2
) -> Iterator[_Batch]:
    """Yield batches in order while threads decode the next ones (PIL releases the GIL while decoding)."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="caption-load")
    queue: deque[tuple[Sequence[Path], list[Future]]] = deque()
    upcoming = iter(chunks)

    def submit_next() -> None:
        chunk = next(upcoming, None)
        if chunk is not None:
            queue.append((chunk, [pool.submit(prepare, path) for path in chunk]))

    try:
        for _ in range(lookahead):
            submit_next()
        while queue:
            chunk, futures = queue.popleft()
            submit_next()
            results = [f.result() for f in futures]
            pixels = [r for r in results if isinstance(r, torch.Tensor)]
            yield _Batch(
                images=[path for path, r in zip(chunk, results, strict=True) if isinstance(r, torch.Tensor)],
                pixel_values=torch.stack(pixels) if pixels else None,
                failed=[r for r in results if isinstance(r, Skipped)],
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def caption_images(
    folder: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    beams: int = 3,
    min_length: int = 5,
    max_length: int = 75,
    top_p: float | None = None,
    prefix: str = "",
    suffix: str = "",
    output: str = "sidecar",
    overwrite: bool = False,
    recursive: bool = False,
    seed: int = 0,
    manifest_dir: str | os.PathLike = "captions",
    progress: bool = True,
) -> CaptionReport:
    """Caption every image in `folder` that has no caption yet; see the module docstring for outputs.

    `batch_size` defaults to 16 on CUDA and 4 on CPU, `dtype` (fp32/fp16/bf16) to fp16 on CUDA and fp32 on
    CPU. Decoding is beam search (`beams`, lengths in tokens) or, with `top_p`, nucleus sampling seeded per
    image from (`seed`, its relative path). Raises `CaptioningError` before any work if an argument, the
    folder, the manifest or the model is unusable, and `CaptioningInterrupted` (a `KeyboardInterrupt`) on
    Ctrl-C, after which every finished caption is on disk.
    """
    validate_options(batch_size, beams, min_length, max_length, top_p, output)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptioningError(f"{folder}: image folder not found; give a folder of images")
    images = list_image_files(folder, recursive)
    if not images:
        where = f"{folder} or its subfolders" if recursive else f"{folder} (add --recursive for subfolders)"
        raise CaptioningError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {where}")

    manifest = manifest_path(folder, manifest_dir) if output != "sidecar" else None
    existing = {e["file_name"]: e["text"] for e in read_manifest_rows(manifest, folder)} if manifest else {}
    plan = plan_captions(folder, images, existing, output, overwrite)
    report = CaptionReport(folder, skipped=plan.skipped, failed=plan.failed, manifest=manifest)
    for image, text in plan.copy_to_sidecar.items():
        atomic_write_text(sidecar_path(image), text + "\n")
        report.copied.append(Captioned(image, text))
    if manifest and plan.copy_to_manifest:
        update_manifest(manifest, folder, plan.copy_to_manifest, overwrite=False)
        report.copied += [Captioned(folder / name, text) for name, text in plan.copy_to_manifest.items()]
    if not plan.todo:
        return report

    batch_size = batch_size or (16 if torch_device.type == "cuda" else 4)
    blip, processor = load_blip(model, torch_device, torch_dtype)
    positions = blip.config.text_config.max_position_embeddings
    if max_length > positions:
        raise CaptioningError(f"max_length {max_length} is over the model's limit of {positions} tokens")

    chunks = [plan.todo[i : i + batch_size] for i in range(0, len(plan.todo), batch_size)]
    start = time.perf_counter()
    # Log lines go through tqdm.write while the bar is shown, so a warning does not break the bar.
    with (
        logging_redirect_tqdm() if progress else contextlib.nullcontext(),
        tqdm(
            total=len(plan.todo), desc="caption", unit="img", disable=not progress, dynamic_ncols=True
        ) as bar,
    ):
        try:
            for batch in _prefetched(chunks, lambda path: _prepare_image(path, processor)):
                for failure in batch.failed:
                    logger.warning("skipped %s: %s", failure.path, failure.reason)
                report.failed.extend(batch.failed)
                if batch.images:
                    names = [p.relative_to(folder).as_posix() for p in batch.images]
                    texts = generate_captions(
                        blip, processor, batch.pixel_values, names, beams, min_length, max_length, top_p, seed
                    )
                    write_batch(
                        report, batch.images, names, texts, prefix, suffix, output, manifest, overwrite
                    )
                bar.update(len(batch.images) + len(batch.failed))
        except KeyboardInterrupt:
            report.seconds = time.perf_counter() - start
            raise CaptioningInterrupted(report) from None
    report.seconds = time.perf_counter() - start
    return report
