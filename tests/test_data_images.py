"""Safe image loading: one test per row of the bad-input table, each on a file the test makes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loratk.data.images import (
    BACKGROUND,
    ImageLoadError,
    check_min_side,
    decode_image,
    load_image,
    read_image_bytes,
)


def _fail(path, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value)  # every report names the file
    return info.value


def test_truncated_jpeg_is_caught_by_a_full_decode_although_verify_passes(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:
        image.verify()  # PIL's own check does not notice
    err = _fail(path)
    assert err.kind == "damaged" and "truncated" in err.reason and "re-export" in err.fix


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    err = _fail(path)
    assert err.kind == "empty" and "0 bytes" in err.reason


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"just some words\n", "text"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"\x89\x01\x02\x03garbage\xff\xfe", "unknown binary data"),
    ],
)
def test_non_image_file_is_identified_by_content(tmp_path, content, expected):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    err = _fail(path)
    assert err.kind == "not_an_image" and expected in err.reason


def test_wrong_extension_is_read_by_content_and_noted(tmp_path):
    path = tmp_path / "really-a-png.jpg"
    Image.new("RGB", (16, 8), (0, 255, 0)).save(path, "PNG")
    decoded = decode_image(read_image_bytes(path), path)
    assert decoded.format == "PNG" and decoded.image.getpixel((0, 0)) == (0, 255, 0)
    assert any("content is PNG" in note and "really-a-png.png" in note for note in decoded.notes)


def test_exif_orientation_is_applied_before_anything_else(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red
    array[:, 20:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the left half ends up on top
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 2)), upright.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    check_min_side(path, upright.size, 20)  # sizes are measured upright


@pytest.mark.parametrize(
    "cmyk, rgb",
    [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))],
)
def test_cmyk_jpeg_is_converted(tmp_path, cmyk, rgb):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), cmyk).save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    got = load_image(path).getpixel((8, 8))
    assert all(abs(a - b) <= 6 for a, b in zip(got, rgb, strict=True)), got


def test_cmyk_with_a_broken_icc_profile_falls_back_to_the_formula(tmp_path):
    path = tmp_path / "cmyk-icc.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, quality=95, icc_profile=b"not a profile")
    got = load_image(path).getpixel((8, 8))
    assert got[0] < 10 and got[1] > 245 and got[2] > 245


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    row = [load_image(path).getpixel((x, 0))[0] for x in range(4)]
    assert row == [0, 64, 128, 255]  # plain convert("RGB") would give [0, 255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_the_documented_background(tmp_path, mode):
    path = tmp_path / f"alpha-{mode}.png"
    if mode == "RGBA":
        image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # black under full transparency
        image.putpixel((1, 1), (255, 0, 0, 128))  # half-transparent red
        image.save(path)
    elif mode == "LA":
        image = Image.new("LA", (4, 4), (0, 0))
        image.putpixel((1, 1), (0, 128))
        image.save(path)
    else:
        image = Image.new("P", (4, 4), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.putpixel((1, 1), 1)
        image.save(path, transparency=0)  # palette index 0 (black) is transparent
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == BACKGROUND  # not the black stored under the transparent pixels
    expected = {"RGBA": (255, 127, 127), "LA": (127, 127, 127), "P": (255, 0, 0)}[mode]
    assert all(abs(a - b) <= 1 for a, b in zip(rgb.getpixel((1, 1)), expected, strict=True))


def test_image_smaller_than_min_side_is_reported(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (30, 50)).save(path)
    with pytest.raises(ImageLoadError) as info:
        check_min_side(path, load_image(path).size, 32)
    assert (
        info.value.kind == "too_small" and "30x50" in str(info.value) and "data.min_side" in str(info.value)
    )


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))  # 100 megapixels claimed in 60 bytes
    err = _fail(path)  # over our cap: refused before any decode, without Pillow's warning
    assert err.kind == "too_large" and "10000x10000" in err.reason and "pixel cap" in err.reason
    path.write_bytes(_png_header_only(30_000, 30_000))  # over Pillow's own hard limit
    err = _fail(path)
    assert err.kind == "too_large" and "decompression bomb" in err.reason


def test_explicit_pixel_cap(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    err = _fail(path, max_pixels=9_999)
    assert err.kind == "too_large" and "data.max_pixels" in err.reason
