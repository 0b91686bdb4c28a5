"""Safe image loading: full decode, EXIF orientation, every PIL mode to 8-bit RGB, a pixel cap.

Every error names the file and says what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MAX_PIXELS = 64_000_000  # explicit cap: larger images are refused, not decoded


class ImageLoadError(ValueError):
    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{path}: {reason}; {fix}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # convert("RGB") clips 16-bit values to 255; scale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode, orient and convert an image to 8-bit RGB, or raise `ImageLoadError`."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)", "re-export or remove it")
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"{image.width}x{image.height} is over the {max_pixels:,}-pixel cap",
                    "downscale it (training never needs more than a few megapixels)",
                )
            image.load()  # full decode: truncated files fail here, verify() would pass them
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            path, "not an image PIL can read", "remove it or convert it to PNG/JPEG"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(path, f"decompression bomb ({err})", "downscale it") from None
    except OSError as err:
        raise ImageLoadError(
            path, f"cannot decode ({err})", "the file is damaged: re-export or remove it"
        ) from None
