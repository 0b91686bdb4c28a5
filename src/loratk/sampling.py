"""Render SDXL images with LoRA adapters: seeded prompts, A1111 PNG text, labelled grids.

One pipeline code path serves three callers: the epoch hook during training (the live model, no reload),
`loratk sample` (a base model plus LoRA files) and DreamBooth's class images (`generate_images`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from loratk.core.checkpoint import atomic_path
from loratk.prompts import PromptSpec, format_parameters, parse_parameters

logger = get_logger(__name__)  # used by the epoch hook only: the CLI reports through its exit code

# id -> (diffusers class, options on top of the model's own scheduler config, A1111 name). Never DDIM by
# default: it gives bad SDXL images (shared/REFERENCE.md §2).
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
}
DEFAULT_SCHEDULER = "euler"
GRID_CELL = 512  # grids scale images down to this side; the PNGs keep full size


class SampleError(ValueError):
    """Bad sampling input (a file, a prompt, a LoRA that does not fit); the message names the file."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything that fixes one image."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    index: int = 1  # 1-based prompt number: file names and grid labels
    loras: tuple[tuple[str, float], ...] = ()  # <lora:name:w> tags of the prompt

    @property
    def filename(self) -> str:
        return f"{self.index:02d}-seed{self.seed}.png"

    @property
    def label(self) -> str:
        return f"#{self.index} seed {self.seed}: {self.prompt}"


def expand_prompts(
    prompts: Sequence[PromptSpec],
    *,
    seeds: Sequence[int],
    width: int,
    height: int,
    steps: int,
    guidance: float,
    negative_prompt: str = "",
) -> list[ImageSpec]:
    """Prompt lines x seeds -> one ImageSpec per image; a line's own options (`--d`, `--w` ...) win."""
    specs = []
    for index, p in enumerate(prompts, start=1):
        for seed in [p.seed] if p.seed is not None else seeds:
            specs.append(
                ImageSpec(
                    prompt=p.prompt,
                    negative_prompt=p.negative_prompt if p.negative_prompt is not None else negative_prompt,
                    width=p.width or width,
                    height=p.height or height,
                    seed=seed,
                    steps=p.steps or steps,
                    guidance=p.guidance if p.guidance is not None else guidance,
                    index=index,
                    loras=p.loras,
                )
            )
    return specs


# ---------------------------------------------------------------- pipeline


def build_scheduler(name: str, base_config: Any, prediction_type: str | None = None) -> Any:
    """A sampling scheduler from the model's own scheduler config (timestep spacing, betas ...)."""
    import diffusers

    if name not in SCHEDULERS:
        raise SampleError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, options, _ = SCHEDULERS[name]
    if prediction_type:
        options = {**options, "prediction_type": prediction_type}
    return getattr(diffusers, cls_name).from_config(base_config, **options)


def sampler_name(scheduler: str) -> str:
    """The A1111 name of a scheduler id (`dpmpp_2m` -> `DPM++ 2M`)."""
    return SCHEDULERS[scheduler][2]


def build_pipeline(
    model: Any, *, scheduler: str = DEFAULT_SCHEDULER, prediction_type: str | None = None
) -> Any:
    """A `StableDiffusionXLPipeline` over the parts of an `SDXLModel`, as they are: no copy, no reload.

    During training these are the live UNet (with its LoRA) and the frozen VAE and text encoders.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2,
        unet=model.unet,
        scheduler=build_scheduler(scheduler, model.noise_scheduler.config, prediction_type),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_latents(vae: Any, latents: torch.Tensor, image_processor: Any) -> list[Image.Image]:
    """Scaled latents [B, 4, H/8, W/8] -> PIL images, never with the VAE in fp16 (SDXL's VAE gives NaN there).

    An fp16 VAE is upcast to fp32 for the decode and put back afterwards.
    """
    upcast = vae.dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    try:
        config = vae.config
        latents = latents.to(vae.device, dtype=vae.dtype)
        if (
            getattr(config, "latents_mean", None) is not None
            and getattr(config, "latents_std", None) is not None
        ):
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with torch.no_grad():
            pixels = vae.decode(latents).sample  # [B, 3, H, W] in [-1, 1]
    finally:
        if upcast:
            vae.to(torch.float16)
    if not torch.isfinite(pixels).all():
        raise SampleError(
            "the decoded image is not finite (NaN/inf): the adapter may have diverged (check train/loss)"
        )
    return image_processor.postprocess(pixels.float(), output_type="pil")


def _batches(specs: Sequence[ImageSpec], batch_size: int) -> Iterator[list[ImageSpec]]:
    """Consecutive specs that differ only in their seed share a batch (one generator per image)."""
    batch: list[ImageSpec] = []
    for spec in specs:
        same = batch and dataclasses.replace(batch[0], seed=spec.seed) == spec
        if batch and (not same or len(batch) >= batch_size):
            yield batch
            batch = []
        batch.append(spec)
    if batch:
        yield batch


def generate_images(
    pipe: Any,
    specs: Sequence[ImageSpec],
    *,
    batch_size: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[tuple[ImageSpec, Image.Image]]:
    """Render `specs` in order and yield (spec, image) as they are done.

    Each image has its own CPU `torch.Generator` seeded with its seed, so an image depends on its seed only
    (not on the batch, the device or the global RNG). `progress(n)` is called after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for batch in _batches(specs, batch_size):
        first = batch[0]
        latents = pipe(
            prompt=first.prompt,
            negative_prompt=first.negative_prompt or None,
            num_images_per_prompt=len(batch),
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in batch],
            output_type="latent",
        ).images
        images = decode_latents(pipe.vae, latents, pipe.image_processor)
        if progress is not None:
            progress(len(batch))
        yield from zip(batch, images, strict=True)


# ---------------------------------------------------------------- PNG files


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str, **text: str) -> None:
    """Write a PNG with an A1111 `parameters` text chunk (and any other `text`), atomically."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    for key, value in text.items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `parameters` text of a PNG written by `save_png` (or by A1111)."""
    with Image.open(path) as image:
        text = image.text.get("parameters")
    if text is None:
        raise SampleError(f"{path}: has no 'parameters' text chunk")
    return parse_parameters(text)


def image_parameters(
    spec: ImageSpec,
    *,
    scheduler: str,
    model: str | None,
    loras: Sequence[tuple[str, float]] = (),
    epoch: int | None = None,
) -> str:
    return format_parameters(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        steps=spec.steps,
        sampler=sampler_name(scheduler),
        guidance=spec.guidance,
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        model=model,
        loras=loras,
        epoch=epoch,
    )


# ---------------------------------------------------------------- grids


@dataclass
class Grid:
    """A labelled grid: column labels on top, row labels on the left, one image per cell."""

    image: Image.Image
    rows: list[str]
    columns: list[str]
    cell_size: tuple[int, int]  # (width, height)
    label_width: int
    header_height: int

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        w, h = self.cell_size
        left, top = self.label_width + column * w, self.header_height + row * h
        return (left, top, left + w, top + h)


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are cut; '...' marks dropped text."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # a word wider than the cell
                cut = len(line)
                while cut > 1 and font.getlength(line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def build_grid(
    cells: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    max_cell: int = GRID_CELL,
) -> Grid:
    """Paste images into a labelled grid. Cells are scaled down to fit `max_cell`; None draws a grey cell."""
    if len(cells) != len(row_labels) or any(len(r) != len(column_labels) for r in cells):
        raise ValueError("cells must be a rows x columns table matching the labels")
    images = [im for row in cells for im in row if im is not None]

    def fitted(im: Image.Image) -> tuple[int, int]:
        scale = min(1.0, max_cell / max(im.size))
        return max(1, round(im.width * scale)), max(1, round(im.height * scale))

    sizes = [fitted(im) for im in images] or [(max_cell // 4, max_cell // 4)]
    cell_w, cell_h = max(s[0] for s in sizes), max(s[1] for s in sizes)
    font_size = min(28, max(10, cell_w // 16))
    font = ImageFont.load_default(size=font_size)
    pad = max(2, font_size // 3)
    line_h = font_size + pad
    header_lines = [_wrap(label, font, cell_w - 2 * pad, 3) for label in column_labels]
    header_h = 2 * pad + line_h * max((len(lines) for lines in header_lines), default=1)
    natural = max((font.getlength(label.split("\n")[0]) for label in row_labels), default=0)
    label_text_w = int(min(natural, max(cell_w, 8 * font_size))) + 1
    label_w = label_text_w + 2 * pad
    max_row_lines = max(1, (cell_h - 2 * pad) // line_h)

    grid = Image.new(
        "RGB", (label_w + cell_w * len(column_labels), header_h + cell_h * len(row_labels)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(header_lines):
        for i, line in enumerate(lines):
            draw.text((label_w + c * cell_w + pad, pad + i * line_h), line, fill="black", font=font)
    for r, label in enumerate(row_labels):
        for i, line in enumerate(_wrap(label, font, label_text_w, max_row_lines)):
            draw.text((pad, header_h + r * cell_h + pad + i * line_h), line, fill="black", font=font)
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            left, top = label_w + c * cell_w, header_h + r * cell_h
            if im is None:
                draw.rectangle((left, top, left + cell_w - 1, top + cell_h - 1), fill=(200, 200, 200))
                draw.text((left + pad, top + pad), "missing", fill="black", font=font)
                continue
            size = fitted(im)
            thumb = im.convert("RGB") if size == im.size else im.convert("RGB").resize(size, Image.LANCZOS)
            grid.paste(thumb, (left + (cell_w - size[0]) // 2, top + (cell_h - size[1]) // 2))
    return Grid(grid, list(row_labels), list(column_labels), (cell_w, cell_h), label_w, header_h)


def save_grid(grid: Grid, path: str | os.PathLike) -> None:
    """Write the grid PNG atomically; its `loratk.grid` text chunk lists the row and column labels."""
    info = PngInfo()
    info.add_text("loratk.grid", json.dumps({"rows": grid.rows, "columns": grid.columns}, ensure_ascii=False))
    with atomic_path(path) as tmp:
        grid.image.save(tmp, format="PNG", pnginfo=info)


def read_grid_labels(path: str | os.PathLike) -> dict[str, list[str]]:
    with Image.open(path) as image:
        return json.loads(image.text["loratk.grid"])


def _open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- model state while sampling


@contextlib.contextmanager
def sampling_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """No grad, eval mode, and a forked RNG; afterwards every train/eval flag and RNG is as it was and
    the memory is freed. Sampling during training therefore changes nothing the training sees.
    """
    import numpy as np

    flags = {m: m.training for module in modules for m in module.modules()}
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for module in modules:
                module.eval()
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)
        free_memory()


@contextlib.contextmanager
def parts_on_device(model: Any, device: torch.device) -> Iterator[None]:
    """Bring parts that were offloaded after caching (VAE, text encoders) to `device` for the duration."""
    moved = []
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(model, name, None)
        if module is not None and module.device != device:
            moved.append((module, module.device))
            module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def adapters_disabled(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: every PEFT adapter layer in `modules` is switched off, then restored as it was
    (peft's toggle also flips `requires_grad`; that is restored too).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = {layer: layer.disable_adapters for layer in layers}
    requires_grad = {p: p.requires_grad for module in modules for p in module.parameters()}
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(not was_disabled[layer])
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def _model_modules(model: Any) -> list[torch.nn.Module]:
    return [model.unet, model.vae, model.text_encoder, model.text_encoder_2]


# ---------------------------------------------------------------- the epoch hook


class SampleHook:
    """An epoch hook (`(epoch, global_step) -> None`) that renders every prompt x seed with the live model.

    Writes `samples/epoch007/NN-seedS.png` (and `samples/base/` once at the start, adapters off) and rebuilds
    `samples/grid.png`: rows = base + each sampled epoch, columns = prompt x seed. A failure (an error, out of
    memory) is logged and training goes on.
    """

    def __init__(
        self,
        *,
        model: Any,
        specs: Sequence[ImageSpec],
        samples_dir: Path,
        scheduler: str,
        every_n_epochs: int,
        num_epochs: int,
        at_start: bool,
        model_name: str,
        prediction_type: str | None = None,
        max_cell: int = GRID_CELL,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.should_stop = should_stop  # a stop request (SIGTERM, Ctrl-C) ends sampling between images
        self.model = model
        self.specs = list(specs)
        self.samples_dir = Path(samples_dir)
        self.scheduler = scheduler
        self.every_n_epochs = every_n_epochs
        self.num_epochs = num_epochs
        self.at_start = at_start
        self.model_name = model_name
        self.prediction_type = prediction_type
        self.max_cell = max_cell

    @property
    def grid_path(self) -> Path:
        return self.samples_dir / "grid.png"

    def epoch_dir(self, epoch: int) -> Path:
        return self.samples_dir / f"epoch{epoch:03d}"

    def samples_epoch(self, epoch: int) -> bool:
        return epoch % self.every_n_epochs == 0 or epoch >= self.num_epochs

    def start(self) -> None:
        """Render the base model (all adapters off), if `at_start`."""
        if self.at_start:
            self._render(self.samples_dir / "base", epoch=None)

    def __call__(self, epoch: int, global_step: int) -> None:
        if self.samples_epoch(epoch):
            self._render(self.epoch_dir(epoch), epoch=epoch)

    def _render(self, folder: Path, epoch: int | None) -> None:
        from tqdm.auto import tqdm

        what = "base model" if epoch is None else f"epoch {epoch}"
        modules = _model_modules(self.model)
        loras = () if epoch is None else ((f"epoch{epoch}", 1.0),)
        bar = tqdm(total=len(self.specs), desc=f"sample {what}", unit="img", leave=False)
        try:
            with (
                sampling_mode(modules),
                parts_on_device(self.model, self.model.unet.device),
                adapters_disabled(modules) if epoch is None else contextlib.nullcontext(),
            ):
                pipe = build_pipeline(
                    self.model, scheduler=self.scheduler, prediction_type=self.prediction_type
                )
                for spec, image in generate_images(pipe, self.specs, progress=bar.update):
                    if self.should_stop is not None and self.should_stop():
                        logger.warning(f"{what}: sampling stopped by a stop request", main_process_only=True)
                        break
                    text = image_parameters(
                        spec, scheduler=self.scheduler, model=self.model_name, loras=loras, epoch=epoch
                    )
                    save_png(image, folder / spec.filename, text)
                del pipe
            self.rebuild_grid(up_to=epoch or 0)
            logger.info(f"{what}: {len(self.specs)} sample(s) in {folder}", main_process_only=True)
        except Exception as err:  # noqa: BLE001 - sampling must never end a training run
            logger.error(
                f"{what}: sampling failed, training continues ({type(err).__name__}: {err})",
                exc_info=True,
                main_process_only=True,
            )
        finally:
            bar.close()
            free_memory()

    def rebuild_grid(self, up_to: int) -> None:
        """Rows: base (if rendered) and every epoch up to `up_to` that this run samples; files read from disk,
        so a resumed run's grid keeps the epochs sampled before the restart.
        """
        rows: list[tuple[str, Path]] = []
        if self.at_start and (self.samples_dir / "base").is_dir():
            rows.append(("base", self.samples_dir / "base"))
        for epoch in range(1, up_to + 1):
            if self.samples_epoch(epoch) and self.epoch_dir(epoch).is_dir():
                rows.append((f"epoch {epoch}", self.epoch_dir(epoch)))
        if not rows:
            return
        cells = [[_open_image(folder / spec.filename) for spec in self.specs] for _, folder in rows]
        grid = build_grid(cells, [r[0] for r in rows], [s.label for s in self.specs], max_cell=self.max_cell)
        save_grid(grid, self.grid_path)


# ---------------------------------------------------------------- LoRA files (for `loratk sample`)

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes into a folder
_DOWN_KEY = re.compile(
    r"^(.+?)\.(?:lora_down|lora_A|lora\.down|lora_linear_layer\.down)(?:\.[^.]+)?\.weight$"
)


def lora_modules(keys: Sequence[str]) -> set[str]:
    """The modules a LoRA state dict adapts (kohya `lora_down`, PEFT `lora_A` or older diffusers keys)."""
    return {m[1] for k in keys if (m := _DOWN_KEY.match(k))}


@dataclass
class LoraFile:
    path: Path
    metadata: dict[str, str]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    @property
    def name(self) -> str:
        """The file stem (`epoch7`), or the folder's name for a diffusers-layout export (`epoch7_diffusers`)."""
        return self.path.parent.name if self.path.name == DIFFUSERS_LORA_FILE else self.path.stem

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("loratk.base_model") or self.metadata.get("ss_sd_model_name") or None

    @property
    def epoch(self) -> int | None:
        value = self.metadata.get("loratk.epoch") or self.metadata.get("ss_epoch")
        return int(value) if value and value.isdigit() else None

    @property
    def resolution(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"(\d+)x(\d+)", self.metadata.get("modelspec.resolution", ""))
        return (int(m[1]), int(m[2])) if m else None

    def run_sample_settings(self) -> dict[str, Any] | None:
        """The `[sample]` section of the run that wrote this file (loratk files carry their recipe)."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib

        text = self.metadata.get("loratk.recipe")
        if not text:
            return None
        try:
            return tomllib.loads(text).get("sample") or None
        except tomllib.TOMLDecodeError:
            return None


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA safetensors file (or a diffusers-layout folder), with errors that name the file.

    Only safetensors are read: pickle files (.ckpt/.pt/.bin) can run code when loaded.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_LORA_FILE).is_file():
        path = path / DIFFUSERS_LORA_FILE
    if not path.exists():
        raise SampleError(f"{path}: LoRA file not found")
    if path.is_dir():
        raise SampleError(f"{path}: is a folder, not a LoRA file; pass the .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise SampleError(
            f"{path}: not a .safetensors file; only safetensors LoRAs are loaded (pickle files such as "
            ".ckpt, .pt or .bin can run code). Convert it to safetensors first"
        )
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SampleError(
            f"{path}: cannot read it as safetensors ({err}); the file is damaged, truncated or not safetensors"
        ) from None
    if not lora_modules(list(tensors)):
        raise SampleError(
            f"{path}: holds no LoRA weights (no lora_down / lora_A keys among {len(tensors)} tensors); "
            "a full checkpoint goes in --model"
        )
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise SampleError(
            f"{path}: tensor {broken[0]}{more} holds NaN/inf values: the adapter is broken (did its training "
            "diverge? check train/loss in metrics.jsonl) and would render black images; use an earlier epoch"
        )
    return LoraFile(path, metadata, tensors)


def _injected_modules(pipe: Any, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1
        for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for m in part.modules()
        if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
    )


def _first_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    return mismatch or (lines[0] if lines else type(err).__name__)


def load_lora_into_pipeline(pipe: Any, lora: LoraFile, adapter: str) -> None:
    """What `pipe.load_lora_weights` does, with the text encoders' part loaded through PEFT directly.

    diffusers converts the file (kohya or diffusers layout) and loads the UNet's part itself; its
    text-encoder path goes through transformers' `load_adapter`, which refuses PEFT releases older than its
    own minimum (transformers 5.24 asks for a PEFT that does not exist yet).
    """
    from loratk.adapters.lora import load_text_encoder_lora

    state_dict, alphas = pipe.lora_state_dict(dict(lora.state_dict), unet_config=pipe.unet.config)
    # A diffusers-layout file keeps each part's LoRA config (rank, alpha) in its metadata.
    raw = lora.metadata.get("lora_adapter_metadata")
    config = json.loads(raw) if raw else {}

    def part(prefix: str) -> dict[str, Any] | None:
        found = {k[len(prefix) + 1 :]: v for k, v in config.items() if k.startswith(prefix + ".")}
        return found or None

    if any(k.startswith("unet.") for k in state_dict):
        pipe.load_lora_into_unet(
            state_dict,
            network_alphas=alphas,
            unet=pipe.unet,
            adapter_name=adapter,
            metadata=config or None,  # diffusers takes its `unet.` share itself
            _pipeline=pipe,
        )
    for name in ("text_encoder", "text_encoder_2"):
        load_text_encoder_lora(
            getattr(pipe, name),
            state_dict,
            prefix=name,
            adapter_name=adapter,
            network_alphas=alphas,
            config=part(name),
        )


def apply_lora(pipe: Any, lora: LoraFile, adapter: str, model_name: str) -> None:
    """Load `lora` into the pipeline as `adapter`; refuse one whose modules don't all fit the base model.

    The file's own modules are counted against what was injected: loaders skip unknown keys silently
    (the "LoRA has no effect" complaint, shared/REFERENCE.md §3).
    """
    expected = len(lora_modules(list(lora.state_dict)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # expected: >1 LoRA
            load_lora_into_pipeline(pipe, lora, adapter)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many types for a foreign file
        raise SampleError(
            f"{lora.path}: does not fit the base model {model_name}: 0 of {expected} LoRA modules could be "
            f"applied ({type(err).__name__}: {_first_reason(err)}). Is it a LoRA for another model?"
        ) from None
    matched = _injected_modules(pipe, adapter)
    if matched < expected:
        raise SampleError(
            f"{lora.path}: does not fit the base model {model_name}: only {matched} of {expected} LoRA "
            "modules matched; is it a LoRA for another model (SD 1.5, another SDXL variant)?"
        )


# ---------------------------------------------------------------- `loratk sample`


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
    from loratk.models.sdxl import DTYPES, freeze_and_cast, load_sdxl

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = load_sdxl(model, single_file_config=model_config)
    freeze_and_cast(parts, torch.device(device), DTYPES[precision or _default_precision(device)])
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


DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_GUIDANCE = (0,), 30, 7.0  # `loratk sample` without a run's settings


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

    from loratk.models.sdxl import ModelLoadError

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
