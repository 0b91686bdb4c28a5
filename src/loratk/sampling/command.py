"""`loratk sample`: prompts x seeds (rows) for each LoRA file x scale (columns), PNGs and a grid."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loratk.adapters.lora_files import LoraFile, apply_lora, load_lora_file
from loratk.prompts import DEFAULT_GUIDANCE, DEFAULT_SEEDS, DEFAULT_STEPS, PromptSpec
from loratk.sampling.images import GRID_CELL, build_grid, image_parameters, save_grid, save_png
from loratk.sampling.pipeline import DEFAULT_SCHEDULER, SCHEDULERS, build_pipeline, generate_images
from loratk.sampling.specs import ImageSpec, SampleError, expand_prompts


@dataclass(frozen=True)
class Column:
    """One grid column of `loratk sample`: the base model, or a LoRA file at one scale (plus prompt tags)."""

    label: str
    slug: str  # file-name part
    lora: LoraFile | None = None
    scale: float = 1.0
    base: bool = False


@dataclass
class SampleResult:
    images: list[Path]
    grid: Path
    model: str
    columns: list[str]
    rows: list[str]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def build_columns(
    loras: Sequence[LoraFile], scales: Sequence[float], *, compare_base: bool, tagged: bool, model: str
) -> list[Column]:
    """Base (if asked) + one column per LoRA file and scale; without files, one column as the prompts say."""
    if not loras and not tagged:
        return [Column(Path(model).name or model, "base", base=True)]
    stems = [lora.name for lora in loras]
    columns = [Column("base", "base", base=True)] if compare_base else []
    for lora in loras:
        name = lora.name if stems.count(lora.name) == 1 else f"{lora.path.parent.name}/{lora.name}"
        for scale in scales:
            plain = len(scales) == 1 and scale == 1
            label = name if plain else f"{name} x{scale:g}"
            slug = _slug(name) if plain else f"{_slug(name)}-x{scale:g}"
            columns.append(Column(label, slug, lora, scale))
    if not loras:
        columns.append(Column("prompt LoRAs", "prompted"))
    return columns


def resolve_lora_tags(
    prompts: Sequence[PromptSpec], lora_dir: Path, known: dict[str, LoraFile]
) -> dict[str, LoraFile]:
    """The LoRA file of every `<lora:name:w>` tag: one of `known` (by file stem) or `lora_dir/name.safetensors`."""
    found: dict[str, LoraFile] = {}
    for number, prompt in enumerate(prompts, start=1):
        for name, _ in prompt.loras:
            if name in found:
                continue
            if name in known:
                found[name] = known[name]
                continue
            path = lora_dir / f"{name}.safetensors"
            if not path.is_file():
                available = (
                    sorted(p.stem for p in lora_dir.glob("*.safetensors")) if lora_dir.is_dir() else []
                )
                raise SampleError(
                    f"{path}: unknown LoRA <lora:{name}> in prompt {number} ({prompt.prompt[:40]!r}); "
                    f"LoRAs in {lora_dir}: {', '.join(available[:20]) or 'none'}. "
                    "Set --lora-dir to the folder that holds it"
                )
            found[name] = load_lora_file(path)
    return found


def _loras_of(
    column: Column, spec: ImageSpec, tag_files: dict[str, LoraFile]
) -> list[tuple[LoraFile, float]]:
    """The LoRAs of one image: the column's file at its scale plus the prompt's tags (one file's weights add)."""
    if column.base:
        return []
    pairs = [(column.lora, column.scale)] if column.lora is not None else []
    weights: dict[int, tuple[LoraFile, float]] = {}
    for lora, weight in pairs + [(tag_files[name], w) for name, w in spec.loras]:
        weights[id(lora)] = (lora, weights.get(id(lora), (lora, 0.0))[1] + weight)
    return list(weights.values())


def _default_precision(device: str) -> str:
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_pipeline(
    model: str,
    *,
    scheduler: str = DEFAULT_SCHEDULER,
    model_config: str | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> Any:
    """A pipeline over a model path (hub id, diffusers folder, single-file checkpoint, builtin:tiny-sdxl).

    Default: bf16 on a GPU, fp32 on the CPU; the VAE stays out of fp16 (`freeze_and_cast`).
    """
    from loratk.core.precision import resolve_dtype
    from loratk.models.family import family_for_model, freeze_and_cast, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = family_for_model(model, single_file_config=model_config)
    parts = load_model(family, model, single_file_config=model_config)
    freeze_and_cast(parts, torch.device(device), resolve_dtype(precision or _default_precision(device)))
    return build_pipeline(parts, scheduler=scheduler)


def _base_model_of(files: Sequence[LoraFile]) -> LoraFile:
    """The first LoRA file whose metadata names its base model."""
    for f in files:
        if f.base_model:
            return f
    why = (
        f"{files[0].path} has no loratk.base_model / ss_sd_model_name metadata" if files else "no LoRA given"
    )
    raise SampleError(
        f"which base model? {why}; pass --model (hub id, diffusers folder or .safetensors file)"
    )


def _prompts_of_run(files: Sequence[LoraFile]) -> tuple[list[PromptSpec], dict[str, Any]]:
    """The `[sample]` prompts of the first file's run (`prompts`, or its `prompts_file` if still there)."""
    from loratk.prompts import load_prompts_file, parse_prompt_line

    settings = files[0].run_sample_settings() if files else None
    if not settings:
        return [], {}
    if settings.get("prompts_file"):
        path = Path(settings["prompts_file"])
        if not path.is_file():
            raise SampleError(
                f"{files[0].path}: its run read its prompts from {path}, which is not there from here; "
                "give --prompt or --prompts-file"
            )
        return load_prompts_file(path, allow_lora_tags=False), settings
    return [parse_prompt_line(line) for line in settings.get("prompts", [])], settings


def run_sample(
    *,
    prompts: Sequence[PromptSpec],
    loras: Sequence[str | os.PathLike] = (),
    model: str | None = None,
    model_config: str | None = None,
    lora_dir: str | os.PathLike | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    size: tuple[int, int] | None = None,
    scheduler: str = DEFAULT_SCHEDULER,
    scales: Sequence[float] = (1.0,),
    compare_base: bool = False,
    negative_prompt: str | None = None,
    out_dir: str | os.PathLike = "samples",
    grid_path: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> SampleResult:
    """Render prompts x seeds (rows) for each LoRA file x scale (columns); write the PNGs and a grid.

    The base model is `model`, or the one the LoRAs' metadata names (`loratk.base_model`, `ss_sd_model_name`).
    The size is `size`, or the LoRA's training resolution, or the model's default: never 512² for SDXL.
    `<lora:name:w>` tags in a prompt add LoRAs from `lora_dir` (default: the first LoRA's folder) to every
    column but the base one.
    """
    from tqdm.auto import tqdm

    if scheduler not in SCHEDULERS:
        raise SampleError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    files = [load_lora_file(p) for p in loras]
    if not prompts:
        # No prompt given: the [sample] prompts (and seeds, steps, CFG, negative) of the run that trained
        # the first LoRA, as its epoch samples were rendered.
        run_prompts, settings = _prompts_of_run(files)
        if not run_prompts:
            raise SampleError(
                "no prompts; give --prompt or --prompts-file"
                + (f" ({files[0].path} records no [sample] prompts of its run)" if files else "")
            )
        prompts = run_prompts
        seeds = seeds if seeds is not None else settings.get("seeds", DEFAULT_SEEDS)
        steps = steps if steps is not None else settings.get("steps", DEFAULT_STEPS)
        guidance = guidance if guidance is not None else settings.get("guidance", DEFAULT_GUIDANCE)
        negative_prompt = (
            negative_prompt if negative_prompt is not None else settings.get("negative_prompt", "")
        )
    seeds = seeds if seeds is not None else DEFAULT_SEEDS
    steps = steps if steps is not None else DEFAULT_STEPS
    guidance = guidance if guidance is not None else DEFAULT_GUIDANCE
    negative_prompt = negative_prompt or ""
    folder = Path(lora_dir) if lora_dir is not None else (files[0].path.parent if files else Path.cwd())
    tag_files = resolve_lora_tags(prompts, folder, {f.name: f for f in files})
    every = files + [f for f in tag_files.values() if all(f is not g for g in files)]
    named_by = None if model else _base_model_of(every)
    model = model or named_by.base_model
    size = size or next((f.resolution for f in every if f.resolution), None)

    from loratk.models.family import ModelLoadError

    try:
        pipe = load_pipeline(
            model, scheduler=scheduler, model_config=model_config, device=device, precision=precision
        )
    except ModelLoadError as err:
        if named_by is None:
            raise
        # kohya files often name a bare checkpoint file here ("sd_xl_base_1.0.safetensors").
        raise SampleError(
            f"{named_by.path}: its metadata names the base model {model!r}, which could not be loaded; "
            f"pass --model\n  {err}"
        ) from None
    if size is None:
        side = pipe.default_sample_size * pipe.vae_scale_factor
        size = (side, side)
    specs = expand_prompts(
        prompts,
        seeds=seeds,
        width=size[0],
        height=size[1],
        steps=steps,
        guidance=guidance,
        negative_prompt=negative_prompt,
    )
    adapter = {id(f): f"lora{i}" for i, f in enumerate(every)}
    for f in every:
        apply_lora(pipe, f, adapter[id(f)], model)

    columns = build_columns(files, scales, compare_base=compare_base, tagged=bool(tag_files), model=model)
    out = Path(out_dir)
    cells: list[list[Image.Image | None]] = [[None] * len(columns) for _ in specs]
    written: list[Path] = []
    active: tuple[tuple[str, float], ...] | None = None
    bar = tqdm(total=len(specs) * len(columns), desc="sample", unit="img", disable=not progress)
    try:
        for c, column in enumerate(columns):
            for r, spec in enumerate(specs):
                used = _loras_of(column, spec, tag_files)
                wanted = tuple((adapter[id(lora)], weight) for lora, weight in used)
                if wanted != active:
                    if wanted:
                        pipe.enable_lora()
                        pipe.set_adapters([a for a, _ in wanted], [w for _, w in wanted])
                    elif every:
                        pipe.disable_lora()
                    active = wanted
                ((_, image),) = generate_images(pipe, [spec], progress=bar.update)
                text = image_parameters(
                    spec,
                    scheduler=scheduler,
                    model=model,
                    loras=[(lora.name, weight) for lora, weight in used],
                    epoch=used[0][0].epoch if len(used) == 1 else None,
                )
                path = out / f"{spec.index:02d}-seed{spec.seed}-{column.slug}.png"
                save_png(image, path, text)
                written.append(path)
                image.thumbnail((GRID_CELL, GRID_CELL))  # the grid needs no more; keeps memory flat
                cells[r][c] = image
    finally:
        bar.close()
    rows, labels = [spec.label for spec in specs], [column.label for column in columns]
    grid_file = Path(grid_path) if grid_path is not None else out / "grid.png"
    save_grid(build_grid(cells, rows, labels), grid_file)
    return SampleResult(written, grid_file, model, labels, rows)
