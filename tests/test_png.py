"""PNGs through libspng (pyspng): the pixels Pillow + transformers' convert_to_rgb give, and
everything libspng does not decode the same way left to Pillow."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

from fastload import decode as decode_module
from fastload.decode import decode
from fastload.header import ImageDecodeError

from .conftest import photo_like

pytest.importorskip("pyspng")


def reference(data: bytes) -> np.ndarray:
    """Pillow opens the bytes, EXIF orientation applied, transformers makes them RGB."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(convert_to_rgb(ImageOps.exif_transpose(im)))


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def photo(h: int = 61, w: int = 47) -> Image.Image:
    return Image.fromarray(photo_like(h, w, seed=h * w))


def rgba() -> Image.Image:
    alpha = np.linspace(0, 255, 61 * 47).astype(np.uint8).reshape(61, 47)
    return Image.fromarray(np.dstack([photo_like(61, 47), alpha]), "RGBA")


def rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(image, exif=exif.tobytes())


SPNG_CASES = {
    "rgb": lambda: png(photo()),
    "rgb, best compression": lambda: png(photo(), compress_level=9),
    "rgb, stored": lambda: png(photo(), compress_level=0),
    "rgba": lambda: png(rgba()),
    "gray": lambda: png(photo().convert("L")),
    "rgb with EXIF orientation 6": lambda: rotated(photo()),
    "one pixel": lambda: png(photo(1, 1)),
}
PILLOW_CASES = {
    "palette": lambda: png(photo().convert("P")),
    "rgb with tRNS": lambda: png(photo(), transparency=(0, 0, 0)),
    "gray with tRNS": lambda: png(photo().convert("L"), transparency=7),
    "16-bit gray": lambda: png(Image.fromarray(photo_like(20, 30)[..., 0].astype(np.uint16) * 257)),
    "gray+alpha": lambda: png(rgba().convert("LA")),
    "1-bit": lambda: png(photo().convert("1")),
    "animated": lambda: _apng(),
}


def _apng() -> bytes:
    buf = io.BytesIO()
    photo().save(buf, format="PNG", save_all=True, append_images=[photo(61, 47).rotate(90)], duration=100)
    return buf.getvalue()


def _spy(monkeypatch) -> list:
    calls = []
    load = decode_module.pyspng.load
    monkeypatch.setattr(decode_module.pyspng, "load", lambda data, fmt: calls.append(fmt) or load(data, fmt))
    return calls


@pytest.mark.parametrize("case", SPNG_CASES)
def test_plain_pngs_decode_through_libspng_as_pillow_does(case, monkeypatch):
    data = SPNG_CASES[case]()
    calls = _spy(monkeypatch)
    assert np.array_equal(decode(data), reference(data))
    assert len(calls) == 1


@pytest.mark.parametrize("case", PILLOW_CASES)
def test_other_pngs_stay_with_pillow(case, monkeypatch):
    data = PILLOW_CASES[case]()
    calls = _spy(monkeypatch)
    assert np.array_equal(decode(data), reference(data))
    assert calls == []


def _with_crc_broken(data: bytes) -> bytes:
    """The first IDAT's checksum flipped."""
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    crc = at + 8 + length
    return data[:crc] + bytes(b ^ 0xFF for b in data[crc:crc + 4]) + data[crc + 4:]


def _truncated(data: bytes) -> bytes:
    return data[: data.index(b"IDAT") + 40]


def _one_row_more(data: bytes) -> bytes:
    """The IHDR rewritten (valid checksum) to claim one more row than the pixel data holds."""
    width, height = struct.unpack(">II", data[16:24])
    body = b"IHDR" + struct.pack(">II", width, height + 1) + data[24:29]
    return data[:12] + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


@pytest.mark.parametrize("damage", [_with_crc_broken, _truncated, _one_row_more])
def test_damaged_pngs_get_pillows_verdict(damage):
    """libspng refuses what it cannot verify; Pillow, the reference, then decides: the same
    pixels or an ImageDecodeError where Pillow raises."""
    data = damage(png(photo(200, 150), compress_level=0))
    try:
        expected = reference(data)
    except Exception:
        with pytest.raises(ImageDecodeError):
            decode(data)
    else:
        assert np.array_equal(decode(data), expected)
