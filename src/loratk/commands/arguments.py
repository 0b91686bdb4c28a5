"""Argument types the commands share: an image size, a positive whole number, a list of LoRA strengths."""

from __future__ import annotations

import argparse


def image_size(text: str) -> tuple[int, int]:
    """`1024` or `1024x768` (width x height)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTH or WIDTHxHEIGHT, e.g. 1024x768, got {text!r}"
        ) from None
    if any(side < 8 or side % 8 for side in size):
        raise argparse.ArgumentTypeError(f"each side must be a multiple of 8, got {text!r}")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def scales(text: str) -> list[float]:
    """`0.5,0.8,1.0` -> [0.5, 0.8, 1.0]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, e.g. 0.5,0.8,1, got {text!r}"
        ) from None
