"""BLIP captioning of an image folder: batched, resumable, and never replaces a caption without `overwrite`.

Captions go to sidecar `.txt` files and/or a manifest `captions/<folder-name>.jsonl` (one
`{"file_name": <path relative to the folder>, "text": ...}` per line). Every file is written atomically after
each batch, so an interrupted run keeps what it finished and a rerun captions only the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from loratk.core.checkpoint import atomic_write_text
from loratk.data.captions import CaptionError, read_sidecar_caption, sidecar_path
from loratk.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from loratk.models.tiny import TINY_BLIP_ID, materialise_tiny_blip

logger = logging.getLogger(__name__)  # a single-process command: no Accelerate state to log through

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
OUTPUTS = ("sidecar", "manifest", "both")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


class CaptioningInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `report` holds what was finished (and is on disk)."""

    def __init__(self, report: CaptionReport):
        super().__init__("captioning interrupted")
        self.report = report


# --- folder and existing captions -----------------------------------------------------------------------


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Images in `folder` (and its subfolders if `recursive`), sorted by relative path; hidden ones ignored."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix())


def manifest_path(folder: Path, manifest_dir: str | os.PathLike = "captions") -> Path:
    return Path(manifest_dir) / f"{folder.resolve().name}.jsonl"


def _check_file_name(name: Any) -> str | None:
    """Why a manifest `file_name` is unusable, or None. Like `datasets`, names must stay inside the folder."""
    if not isinstance(name, str) or not name:
        return "file_name must be a non-empty string"
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return f"file_name {name!r} must be a path relative to the image folder, without '..'"
    return None


def read_manifest(path: Path) -> list[dict]:
    """The manifest's entries in file order; every malformed line is reported together, with its number."""
    if not path.exists():
        return []
    entries, problems, seen = [], [], set()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CaptioningError(f"{path}: cannot read the manifest ({err}); fix or move it") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            problems.append(f'{path}:{number}: expected {{"file_name": ..., "text": ...}}')
            continue
        if why := _check_file_name(entry.get("file_name")):
            problems.append(f"{path}:{number}: {why}")
            continue
        if entry["file_name"] in seen:
            problems.append(f"{path}:{number}: {entry['file_name']!r} appears twice; keep one line")
            continue
        seen.add(entry["file_name"])
        entries.append(entry)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise CaptioningError(
            f"{len(problems)} problem(s) in the manifest, which is left untouched:\n{listed}"
        )
    return entries


def write_manifest(path: Path, entries: Sequence[dict]) -> None:
    """Rewrite the whole manifest under a temp name and rename it: a kill never leaves a half line."""
    atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def update_manifest(path: Path, captions: dict[str, str], overwrite: bool) -> set[str]:
    """Merge `captions` (file_name -> text) into the manifest as it is on disk now; return the names kept.

    Reading it again each time keeps edits made while a run goes on: an existing non-empty entry is
    replaced only with `overwrite`. New entries are appended, existing ones keep their place and extra keys.
    """
    entries = read_manifest(path)
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


# --- model and decoding ---------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise CaptioningError(f"device {device!r}: {err}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CaptioningError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CaptioningError(f"dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_blip(model: str, device: torch.device, dtype: torch.dtype):
    """`BlipForConditionalGeneration` + `BlipProcessor` from a hub id, a folder or `builtin:tiny-blip`."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    where = str(materialise_tiny_blip()) if model == TINY_BLIP_ID else model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise CaptioningError(f"--model {model!r}: no such folder; give a BLIP folder or a hub id")
    where = os.path.expanduser(where)
    try:
        processor = BlipProcessor.from_pretrained(where)
        blip = BlipForConditionalGeneration.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as err:
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"
            if os.environ.get("HF_HUB_OFFLINE") == "1"
            else "check the hub id or folder (a BLIP captioning model, e.g. Salesforce/blip-image-captioning-base)"
        )
        raise CaptioningError(
            f"--model {model!r}: could not load a BLIP captioner: {err}\n  hint: {hint}"
        ) from err
    return blip.to(device).eval(), processor


def compute_image_seed(seed: int, file_name: str) -> int:
    """A 63-bit seed from (run seed, image path): a caption never depends on which batch the image is in."""
    digest = hashlib.sha256(f"{seed}\0{file_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerImageGumbelSampler(LogitsProcessor):
    """Sampling as argmax(logits + Gumbel noise), with one noise generator per image (Gumbel-max trick).

    This draws exactly from softmax(logits), like `do_sample=True`, but `torch.multinomial` would draw the
    whole batch from one stream, so an image's caption would change with its neighbours and the batch size.
    Here row i only ever sees its own stream, so batch 1, batch 16 and a resumed run all agree.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, vocab]; one row per image (a single beam). The noise is drawn on the CPU in fp32 so it is
        # the same on every device.
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def build_generate_kwargs(
    beams: int, min_length: int, max_length: int, top_p: float | None, seeds: Sequence[int]
) -> dict[str, Any]:
    """Arguments for `generate`: beam search by default, nucleus sampling when `top_p` is set."""
    kwargs: dict[str, Any] = dict(min_length=min_length, max_length=max_length, do_sample=False)
    if top_p is None:
        return dict(kwargs, num_beams=beams)
    # Greedy decoding over top-p-filtered logits plus per-image Gumbel noise = seeded nucleus sampling.
    processors = LogitsProcessorList([TopPLogitsWarper(top_p), PerImageGumbelSampler(seeds)])
    return dict(kwargs, num_beams=1, logits_processor=processors)


def _validate(
    batch_size: int | None, beams: int, min_length: int, max_length: int, top_p: float | None, output: str
) -> None:
    problems = []
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if beams < 1:
        problems.append(f"beams must be >= 1, got {beams}")
    if min_length < 0 or max_length < 1 or min_length > max_length:
        problems.append(f"need 0 <= min_length <= max_length, got {min_length} and {max_length}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if output not in OUTPUTS:
        problems.append(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if problems:
        raise CaptioningError("; ".join(problems))


# --- the run ----------------------------------------------------------------------------------------------


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
    _validate(batch_size, beams, min_length, max_length, top_p, output)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptioningError(f"{folder}: image folder not found; give a folder of images")
    images = find_images(folder, recursive)
    if not images:
        where = f"{folder} or its subfolders" if recursive else f"{folder} (add --recursive for subfolders)"
        raise CaptioningError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {where}")

    manifest = manifest_path(folder, manifest_dir) if output != "sidecar" else None
    existing = {e["file_name"]: e["text"] for e in read_manifest(manifest)} if manifest else {}
    plan = plan_captions(folder, images, existing, output, overwrite)
    report = CaptionReport(folder, skipped=plan.skipped, failed=plan.failed, manifest=manifest)
    for image, text in plan.copy_to_sidecar.items():
        atomic_write_text(sidecar_path(image), text + "\n")
        report.copied.append(Captioned(image, text))
    if manifest and plan.copy_to_manifest:
        update_manifest(manifest, plan.copy_to_manifest, overwrite=False)
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
                    texts = _generate(
                        blip, processor, batch.pixel_values, names, beams, min_length, max_length, top_p, seed
                    )
                    _write_batch(
                        report, batch.images, names, texts, prefix, suffix, output, manifest, overwrite
                    )
                bar.update(len(batch.images) + len(batch.failed))
        except KeyboardInterrupt:
            report.seconds = time.perf_counter() - start
            raise CaptioningInterrupted(report) from None
    report.seconds = time.perf_counter() - start
    return report


@torch.inference_mode()
def _generate(
    blip: Any,
    processor: Any,
    pixel_values: torch.Tensor,
    names: Sequence[str],
    beams: int,
    min_length: int,
    max_length: int,
    top_p: float | None,
    seed: int,
) -> list[str]:
    seeds = [compute_image_seed(seed, name) for name in names]
    kwargs = build_generate_kwargs(beams, min_length, max_length, top_p, seeds)
    pixel_values = pixel_values.to(device=blip.device, dtype=blip.dtype)
    tokens = blip.generate(pixel_values=pixel_values, **kwargs)  # [B, <= max_length], padded
    return [" ".join(text.split()) for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def _write_batch(
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
        kept = update_manifest(manifest, {n: c for n, (_, c) in done.items()}, overwrite=overwrite)
    for name, (image, caption) in done.items():
        if name in kept:
            report.skipped.append(Skipped(image, "a manifest entry appeared while running; kept it"))
        else:
            report.captioned.append(Captioned(image, caption))
