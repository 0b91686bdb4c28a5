"""Image files of a sampling run: A1111 `parameters` PNG text, and labelled grids (rows x columns)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from loratk.files import atomic_path
from loratk.prompts import format_parameters, parse_parameters
from loratk.sampling.pipeline import sampler_name
from loratk.sampling.specs import ImageSpec, SampleError

GRID_CELL = 512  # grids scale images down to this side; the PNGs keep full size


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


def open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError):
        return None
