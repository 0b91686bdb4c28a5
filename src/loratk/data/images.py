"""Safe image loading: full decode, EXIF orientation, every PIL mode to 8-bit RGB, explicit size limits.

Every error names the file, says what is wrong and what to do about it, and carries a short `kind`
(`empty`, `not_an_image`, `damaged`, `too_large`, `too_small`, `unreadable`) that reports group by.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loratk.data.buckets import Transform

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, palette transparency) are composited onto white
MAX_PIXELS = 64_000_000  # explicit cap: larger images are refused from their header, never decoded

# The PIL format names each extension may hold (MPO = the multi-picture JPEG many cameras write).
_FORMATS = {
    ".png": {"PNG"},
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP", "DIB"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
}
_EXTENSION_FOR = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}

KIND_LABELS = {
    "empty": "empty file (0 bytes)",
    "not_an_image": "not an image",
    "damaged": "truncated or damaged",
    "too_large": "over the pixel cap",
    "too_small": "smaller than data.min_side",
    "unreadable": "cannot be read",
}


class ImageLoadError(ValueError):
    def __init__(self, path: str | os.PathLike, reason: str, fix: str, kind: str = "damaged"):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        self.kind = kind
        super().__init__(f"{path}: {reason}; {fix}")


@dataclass
class DecodedImage:
    image: Image.Image  # 8-bit RGB, upright
    format: str  # what the content is (PIL's name), whatever the file is called
    notes: list[str] = field(default_factory=list)  # harmless oddities worth a line in the report


def describe_content(data: bytes) -> str:
    """A guess at what a file that PIL cannot read really holds, from its first bytes."""
    head = data[:64]
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand.startswith(("heic", "heix", "mif1", "msf1", "hevc")):
            return "a HEIC/HEIF photo, which this Pillow cannot decode"
        return f"an ISO media file (brand {brand!r}), not an image Pillow can decode"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if stripped.startswith((b"{", b"[")):
        return "JSON text"
    try:
        data[:4096].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return f"unknown binary data (starts with {head[:8].hex(' ')})"


def list_image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files (by extension) in `folder`, and its subfolders if `recursive`, sorted by relative path;
    hidden files and folders are ignored. [] for a folder that does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix())


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; 0-byte and unreadable files raise `ImageLoadError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageLoadError(
            path,
            f"cannot read the file ({err.strerror or err})",
            "check it exists and is readable",
            "unreadable",
        ) from None
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)", "re-export it or remove it", "empty")
    return data


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, without clipping high bit depths or keeping colours under transparency."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # convert("RGB") clips 16-bit values to 255 (an almost white image); scale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max() <= 1.0 else 255.0  # float images hold 0..1 or 0..255
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if ("transparency" in image.info or image.mode == "PA") else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa") or (
        image.mode in ("RGB", "L") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when it has one, else Pillow's (Adobe-aware) formula."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile must not lose the image: fall back to the formula
            pass
    return image.convert("RGB")


def decode_image(data: bytes, path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Fully decode image bytes to upright 8-bit RGB, or raise `ImageLoadError` naming `path`."""
    path = Path(path)
    notes: list[str] = []
    try:
        # Image.open reads the header only (Pillow itself refuses sizes over twice its own limit). Its
        # DecompressionBombWarning is dropped: the pixel cap below reports the image, naming the fix.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as image:
            fmt = image.format or "unknown"
            if image.width * image.height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"{image.width}x{image.height} is over the {max_pixels:,}-pixel cap (data.max_pixels)",
                    "downscale it (training never needs more than a few megapixels)",
                    "too_large",
                )
            if getattr(image, "n_frames", 1) > 1:
                notes.append(f"{image.n_frames} frames; only the first is used")
            image.load()  # full decode: truncated files fail here, verify() would pass them
            try:
                # Orientation first, before any size is measured or any pixel is changed.
                upright = ImageOps.exif_transpose(image)
            except Exception as err:  # malformed EXIF: keep the pixels, say so
                notes.append(f"EXIF orientation unreadable ({err}); used as stored")
                upright = image
            rgb = _to_rgb(upright)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            path,
            f"not an image: the content is {describe_content(data)}",
            "remove it, or convert it to PNG/JPEG",
            "not_an_image",
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            path, f"decompression bomb refused by Pillow ({err})", "downscale it", "too_large"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(
            path, f"cannot decode ({err})", "the file is damaged: re-export it or remove it", "damaged"
        ) from None
    expected = _FORMATS.get(path.suffix.lower())
    if expected is not None and fmt not in expected:
        better = _EXTENSION_FOR.get(fmt, f".{fmt.lower()}")
        notes.append(f"content is {fmt} but the name ends in {path.suffix}; rename it to {path.stem}{better}")
    return DecodedImage(rgb, fmt, notes)


def check_min_side(path: str | os.PathLike, size: tuple[int, int], min_side: int) -> None:
    """Raise `ImageLoadError` (kind `too_small`) when the shorter side of `size` (w, h) is below `min_side`."""
    if min(size) < min_side:
        raise ImageLoadError(
            path,
            f"{size[0]}x{size[1]} is smaller than data.min_side = {min_side}",
            "use a larger original, or lower data.min_side if upscaling it is acceptable",
            "too_small",
        )


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode, orient and convert an image to 8-bit RGB, or raise `ImageLoadError`."""
    return decode_image(read_image_bytes(path), path, max_pixels).image


def sniff_image_format(path: str | os.PathLike) -> str | None:
    """PIL's format name if the file's content is an image (header only), else None."""
    try:
        with Image.open(path) as image:
            return image.format
    except Exception:
        return None


# ---------------------------------------------------------------- the pixel side of a bucket transform


def apply_transform(image: Image.Image, transform: Transform) -> Image.Image:
    """Resize (Lanczos) to cover the bucket, crop, and mirror if the transform says so."""
    image = image.resize(transform.resized, Image.Resampling.LANCZOS)
    top, left = transform.crop
    image = image.crop((left, top, left + transform.bucket[0], top + transform.bucket[1]))
    if transform.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
