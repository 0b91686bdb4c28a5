"""Caption reading: sidecar text files next to each image; errors name the file."""

from __future__ import annotations

import os
from pathlib import Path


class CaptionError(ValueError):
    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{path}: {reason}; {fix}")


def sidecar_path(image_path: str | os.PathLike, ext: str = ".txt") -> Path:
    return Path(image_path).with_suffix(ext)


def read_sidecar_caption(image_path: str | os.PathLike, ext: str = ".txt") -> str:
    """The caption in `image.txt` beside `image.png`, stripped; raise `CaptionError` if unusable."""
    path = sidecar_path(image_path, ext)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptionError(
            path, "caption file is missing", f"write one, or run `loratk caption {Path(image_path).parent}`"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionError(
            path, f"not UTF-8 (bad byte at offset {err.start})", "re-save it as UTF-8"
        ) from None
    text = " ".join(text.split())
    if not text:
        raise CaptionError(path, "caption is empty", "write a caption into it, or remove the image")
    return text


def apply_trigger_word(caption: str, trigger: str | None) -> str:
    """Put the trigger word once at the front, unless the caption already starts with it."""
    if not trigger:
        return caption
    if caption == trigger or caption.startswith((trigger + ",", trigger + " ")):
        return caption
    return f"{trigger}, {caption}"
