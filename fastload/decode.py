"""Image bytes -> RGB uint8 pixels, reading only as much as the model needs.

JPEGs go through libjpeg-turbo (via ``simplejpeg``, which bundles libjpeg-turbo 3.x and
needs no system library), optionally scaled in the DCT domain (1/2, 1/4, 1/8); plain 8-bit
PNGs through libspng (``pyspng``: the same pixels as Pillow's, inflated and unfiltered faster,
benchmarks/RESULTS.md); every other format goes through Pillow. The header
(:mod:`fastload.header`) is read before this module is called, usually once per sample for
token counting, and handed over as a
:class:`~fastload.header.ParsedImage`; the decoder's own view is checked against it:
libjpeg-turbo writes into a buffer of exactly the size the header promises (it refuses a
larger image before decoding), Pillow's header is compared before ``load``, and the decoded
size after. A sample whose header disagrees with its pixels fails with
:class:`ImageDecodeError`, so token counts can never silently disagree with the pixels.
"""
from __future__ import annotations

import math

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

try:
    import pyspng
except ImportError:  # no wheel for this platform: Pillow decodes every PNG
    pyspng = None

from .header import (MAX_IMAGE_PIXELS, DecompressionBombError, Header, ImageDecodeError, ParsedImage,
                     _needs_compositing, _open_pillow, _stored_size, _via_libjpeg, as_bytes, check_pixels,
                     decode_cost, read_header)

__all__ = ["DCT_SCALES", "LIBJPEG_SCALES", "DecompressionBombError", "ImageDecodeError", "decode", "decode_cost",
           "decode_jpeg_scaled", "dct_scale", "pil_to_rgb", "scaled_size"]

#: (numpy view transform) per EXIF orientation; equal to Pillow's ``ImageOps.exif_transpose``.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}


# -- decoding ----------------------------------------------------------------------------------
def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """RGB the way transformers' ``convert_to_rgb`` makes it: alpha composited onto white.
    Intermediates are dropped as soon as they are used (see ``decode_cost``)."""
    if _needs_compositing(im):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        del rgba, white
        return np.asarray(rgb)
    if im.mode == "RGB":
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


def _check_decoded(rgb: np.ndarray, width: int, height: int, what: str) -> np.ndarray:
    """The decoded size must be the one the header gave (and the token count was made from)."""
    if rgb.shape[:2] != (height, width):
        raise ImageDecodeError(f"{what}: the header says {width}x{height}, the decoder gave "
                               f"{rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def _decode_pillow(data: bytes, header: Header, orient: bool = True,
                   max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Pillow's decode, with its own header checked against ours and against the limits
    (mode and transparency as it will decode them) before ``load`` allocates anything."""
    try:
        with _open_pillow(data, header.format) as im:
            width, height = _stored_size(im)
            if (width, height) != (header.width, header.height):
                raise ImageDecodeError(f"{header.format} header says {header.width}x{header.height}, "
                                       f"Pillow reads {width}x{height}")
            check_pixels(Header(header.format, width, height, header.orientation, im.mode,
                                _needs_compositing(im), header.progressive), max_pixels)
            im.load()
            if orient:
                ImageOps.exif_transpose(im, in_place=True)
            rgb = pil_to_rgb(im)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    width, height = header.size if orient else (header.width, header.height)
    return _check_decoded(rgb, width, height, header.format)


#: Every DCT scaling factor M/8 libjpeg-turbo decodes at (its scaled IDCTs, 1x1 to 8x8 per block).
LIBJPEG_SCALES = (1, 2, 3, 4, 5, 6, 7, 8)

#: The factors fast mode picks from: those libjpeg-turbo has SIMD IDCTs for (1/2, 1/4; 1/8 keeps
#: only the DC coefficient). The others run in plain C: on real photos at the 1 MP budget they
#: decode slower than the next power of two up, often slower than a full decode, and further
#: from the exact pixels (benchmarks/bench_dct.py; benchmarks/RESULTS.md).
DCT_SCALES = (1, 2, 4, 8)


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """(width, height) libjpeg-turbo outputs at ``scale``/8: each side rounded up
    (``jpeg_calc_output_dimensions``; ``tests/test_dct_scale.py`` checks it against the library)."""
    return math.ceil(width * scale / 8), math.ceil(height * scale / 8)


def dct_scale(header: Header, target_hw: tuple[int, int] | None, scales: tuple[int, ...] = DCT_SCALES) -> int:
    """Smallest M in ``scales`` whose M/8 decode still covers the resize target (height,
    width); 8 (no scaling) when none does or there is no target."""
    if target_hw is None:
        return 8
    width, height = header.size
    th, tw = target_hw
    for scale in sorted(scales):
        w, h = scaled_size(width, height, scale)
        if h >= th and w >= tw:
            return scale
    return 8


def decode_jpeg_scaled(data: bytes, header: Header, scale: int, fast: bool) -> np.ndarray:
    """libjpeg-turbo's decode at ``scale``/8 (stored orientation), into a buffer of exactly the
    size ``header`` gives at that scale: libjpeg-turbo reads its own header once, in the
    decode, and an image larger than ours claims is refused before a pixel is written.
    Raises what ``simplejpeg`` raises."""
    width, height = scaled_size(header.width, header.height, scale)
    rgb = simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast, min_height=height,
                                 min_width=width, buffer=np.empty((height, width, 3), np.uint8))
    return _check_decoded(rgb, width, height, "jpeg")


def _decode_jpeg(data: bytes, header: Header, target_hw: tuple[int, int] | None, fast: bool,
                 orient: bool = True, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    try:
        rgb = decode_jpeg_scaled(data, header, dct_scale(header, target_hw), fast)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception:
        # libjpeg-turbo's warnings are errors here (corrupt data, premature end, extraneous
        # bytes), and so is a frame larger than the header's; Pillow, the reference, decodes
        # through some of them and compares its own header with ours: it decides.
        return _decode_pillow(data, header, orient, max_pixels)
    transform = _ORIENT.get(header.orientation) if orient else None
    return transform(rgb) if transform else rgb


#: PNG colour types libspng decodes, at 8 bits per sample, to exactly Pillow's pixels: gray, RGB, RGBA.
_SPNG_COLOUR_TYPES = {0: "L", 2: "RGB", 6: "RGBA"}


def _via_spng(data: bytes, header: Header) -> bool:
    """A PNG that libspng decodes as Pillow does: IHDR first (the one libspng reads), 8 bits,
    gray/RGB/RGBA without tRNS (``header.alpha`` only from the RGBA band), not animated."""
    if pyspng is None or header.format != "png" or header.animated or data[12:16] != b"IHDR":
        return False
    mode = _SPNG_COLOUR_TYPES.get(data[25])
    return data[24] == 8 and mode == header.mode and header.alpha == (mode == "RGBA")


def _decode_spng(data: bytes, header: Header, orient: bool = True,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    try:
        pixels = pyspng.load(data, header.mode)
    except Exception:
        return _decode_pillow(data, header, orient, max_pixels)  # bad data: the reference decides
    pixels = _check_decoded(pixels, header.width, header.height, "png")
    if header.mode == "L":
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)  # Pillow's L -> RGB copies the gray level
    elif header.mode == "RGBA":
        rgb = pil_to_rgb(Image.fromarray(pixels, "RGBA"))  # transformers' compositing, by Pillow itself
    else:
        rgb = pixels
    transform = _ORIENT.get(header.orientation) if orient else None
    return transform(rgb) if transform else rgb


def decode(source, *, target_hw: tuple[int, int] | None = None, fast: bool = False,
           max_pixels: int | None = MAX_IMAGE_PIXELS, header: Header | None = None,
           orient: bool = True) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels of an encoded image, EXIF orientation applied (``orient=False``
    keeps the stored layout, as pipelines that never call ``exif_transpose`` see it).

    ``source`` is bytes, a path, or a :class:`~fastload.header.ParsedImage` (its header is
    not parsed again, nor checked again: :func:`~fastload.header.parse_image` checked it).
    ``target_hw`` allows a JPEG to be decoded DCT-scaled (:func:`dct_scale`), no smaller than that (height,
    width). ``fast`` lets libjpeg-turbo use its faster integer IDCT and plain chroma
    upsampling: 8-15% less time, 42-56 dB from the accurate decode on real photos, so only
    for callers that resize and accept approximate pixels anyway (the processor's fast mode).
    The array may be a strided view (orientation is applied by strides, not copies).
    ``header`` saves parsing bytes' header again when the caller already has it; the decoded
    size is checked against it (:class:`ImageDecodeError` when they differ). ``max_pixels``
    and ``MAX_IMAGE_BYTES`` are checked before decoding (:class:`DecompressionBombError`).
    """
    if isinstance(source, ParsedImage):
        data, header = source.data, source.header
    else:
        data = as_bytes(source)
        header = header or read_header(data)
        check_pixels(header, max_pixels)
    if _via_libjpeg(header):
        return _decode_jpeg(data, header, target_hw, fast, orient, max_pixels)
    if _via_spng(data, header):
        return _decode_spng(data, header, orient, max_pixels)
    return _decode_pillow(data, header, orient, max_pixels)
