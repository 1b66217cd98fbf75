"""What an image's bytes say before a pixel is decoded: format, size, EXIF/XMP orientation,
the mode it decodes to, and whether decoding it fits the limits (decompression bombs).

Headers are read as their decoder reads them, so that token counts made from a header always
match the pixels decoded later:

- JPEG by hand (per sample, for token counting: ~10 us against Pillow's ~40 us), walking the
  marker segments as Pillow's ``JpegImagePlugin`` does, with the frame header libjpeg uses
  (the first; a second one is an error there as here). Orientation is Pillow's: EXIF IFD0,
  else XMP ``tiff:Orientation`` (``ImageOps.exif_transpose`` honours both); EXIF that is
  not in the plain form goes to Pillow's own EXIF reader.
- Every other format by Pillow's lazy ``open`` (it reads no pixels), which is what decodes
  it; PNG orientation from a walk over the chunks Pillow reads before and after ``IDAT``.

A header is parsed once per image: :func:`parse_image` reads and checks it, and the
:class:`ParsedImage` it returns travels from token counting to the decoder.
Every failure is an :class:`ImageDecodeError` (a ``ValueError``), or its subclass
:class:`DecompressionBombError` for an image over the pixel limit or the memory budget;
``MemoryError`` alone passes through (the machine, not the sample, ran out).
"""
from __future__ import annotations

import io
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image


def _env_bytes(name: str, default: int) -> int | None:
    """A byte count from the environment (``0`` or ``none``: no budget)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return None if value in ("0", "none") else int(float(value))


#: Refuse images whose header claims more pixels than this (Pillow's warning threshold).
MAX_IMAGE_PIXELS = 89_478_485

#: Refuse images whose decode would hold more than this many bytes at its peak (see
#: :func:`decode_cost`: pixels x bytes per pixel of the decoded mode and of each conversion
#: to RGB). The pixel limit alone lets a 9000x9900 RGBA PNG need 2 GB, so both apply.
#: ``None`` turns the budget off; set it here or, for every worker process, with the
#: ``FASTLOAD_MAX_IMAGE_BYTES`` environment variable (bytes; ``0`` for no budget).
MAX_IMAGE_BYTES = _env_bytes("FASTLOAD_MAX_IMAGE_BYTES", 768 << 20)


class ImageDecodeError(ValueError):
    """An image that cannot be decoded, or whose header disagrees with its pixels; the
    message names the problem."""


class DecompressionBombError(ImageDecodeError):
    """An image over the configured pixel limit or memory budget."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, before any decoding."""

    format: str
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int = 1
    mode: str = "RGB"  # the mode it decodes to, as Pillow names it ("L", "P", "RGBA", "CMYK", "I;16", ...)
    alpha: bool = False  # composited onto white on the way to RGB (alpha band or transparency)
    progressive: bool = False  # JPEG: several scans, so the decoder keeps every coefficient
    animated: bool = False  # APNG: Pillow decodes its first frame, which need not be the IDAT image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation: what the model sees."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def sniff_format(data: bytes) -> str | None:
    """The real format from the leading bytes; file names are never trusted."""
    head = bytes(data[:16])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


#: File extension used when storing an image of each format in a shard.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif", "webp": "webp", "bmp": "bmp", "tiff": "tiff"}

#: Pillow's plugin per sniffed format: nothing else is ever opened (no EPS, no PSD, ...).
_PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


# -- orientation: EXIF IFD0, else XMP, as Pillow's getexif() reads them -----------------------
_ORIENTATION_TAG = 0x0112
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_XMP_ORIENTATION_STR = re.compile(r'tiff:Orientation(="|>)([0-9])')
#: Bytes per value of each TIFF field type Pillow reads (others it passes over).
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_ABSENT = object()


class _Irregular(Exception):
    """EXIF outside the plain form the fast reader knows: Pillow's reader decides."""


def _strip_exif_prefix(payload: bytes) -> bytes:
    """What Pillow's ``Exif.load`` parses: one or two leading ``Exif\\0\\0`` removed."""
    for _ in range(2):
        if payload[:6] == b"Exif\x00\x00":
            payload = payload[6:]
    return payload


def _fast_exif_orientation(tiff: bytes):
    """IFD0's orientation when the EXIF is in the plain form (a SHORT, count 1, every field
    before it readable), else raises ``_Irregular``. Equal to Pillow's value where it
    answers (the fuzz test compares them); ``_ABSENT`` when IFD0 has no orientation."""
    endian = {b"II*\x00": "<", b"MM\x00*": ">"}.get(tiff[:4])
    if endian is None or len(tiff) < 8:
        raise _Irregular
    (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        raise _Irregular
    (count,) = struct.unpack_from(endian + "H", tiff, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if entry + 12 > len(tiff):
            raise _Irregular  # Pillow stops reading IFD0 here
        tag, typ, n, offset = struct.unpack_from(endian + "HHII", tiff, entry)
        if tag == _ORIENTATION_TAG:
            if typ != 3 or n != 1:
                raise _Irregular
            return struct.unpack_from(endian + "H", tiff, entry + 8)[0]
        unit = _TIFF_UNIT.get(typ)
        if unit is not None and unit * n > 4 and offset + unit * n > len(tiff):
            raise _Irregular  # out-of-range data: Pillow may stop reading IFD0 here
    return _ABSENT


def _pillow_exif_orientation(payload: bytes | str):
    """IFD0's orientation through Pillow's own EXIF reader; raises what it raises."""
    exif = Image.Exif()
    exif.load(payload)
    return exif[_ORIENTATION_TAG] if _ORIENTATION_TAG in exif else _ABSENT


def _exif_orientation(payload: bytes | str):
    """Orientation value in an EXIF payload (``_ABSENT`` when IFD0 has none)."""
    if isinstance(payload, bytes):
        try:
            return _fast_exif_orientation(_strip_exif_prefix(payload))
        except (_Irregular, struct.error):
            pass
    return _pillow_exif_orientation(payload)


def _xmp_orientation(xmp: bytes | str | None):
    """``tiff:Orientation`` in XMP, matched as Pillow's ``getexif`` matches it."""
    if not xmp:
        return _ABSENT
    pattern = _XMP_ORIENTATION_STR if isinstance(xmp, str) else _XMP_ORIENTATION
    match = pattern.search(xmp)
    return int(match[2]) if match else _ABSENT


def _transposing(value) -> int:
    """The orientation ``exif_transpose`` applies for a tag value (1: none); any value
    Pillow may hand it (int, float, rational, tuple, bytes) is looked up as it does."""
    try:
        return {2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8}.get(value, 1)
    except TypeError:
        return 1


def _orientation(exif: bytes | str | None, xmp: bytes | str | None) -> int:
    """Pillow's orientation: IFD0's tag when present (whatever its value), else XMP's."""
    value = _ABSENT if exif is None else _exif_orientation(exif)
    if value is _ABSENT:
        value = _xmp_orientation(xmp)
    return 1 if value is _ABSENT else _transposing(value)


# -- JPEG ------------------------------------------------------------------------------------
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE}  # DHP too, as Pillow
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_PARAMETERLESS = {0x01, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}  # TEM, RSTn, SOI, EOI, JPGn
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_JPEG_COMPONENTS = {mode: n for n, mode in _JPEG_MODES.items()}
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, body start, body end) of each marker segment before the first SOS, found as
    Pillow's ``JpegImagePlugin`` finds them (junk and fill bytes skipped); bodies are not
    copied (an ICC profile can fill megabytes). Every length is checked against the data: a
    segment running past its end is a truncated header."""
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            pos += 1  # junk between segments, passed over as libjpeg and Pillow do
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0x00 or marker in _PARAMETERLESS:
            pos += 2
        elif marker < 0xC0:
            raise ImageDecodeError(f"invalid JPEG marker 0xff{marker:02x} at byte {pos}")
        elif pos + 4 > n:
            raise ImageDecodeError("truncated JPEG header")
        else:
            (length,) = struct.unpack_from(">H", data, pos + 2)
            length = max(length, 2)  # 0 or 1: an empty segment to libjpeg and Pillow alike
            if pos + 2 + length > n:
                raise ImageDecodeError(f"JPEG segment 0xff{marker:02x} of length {length} at byte {pos} "
                                       f"does not fit the {n}-byte file")
            yield marker, pos + 4, pos + 2 + length
            if marker == 0xDA:
                return
            pos += 2 + length


def _jpeg_frame(body: bytes, marker: int) -> tuple[int, int, str, bool]:
    """(width, height, mode, progressive) of a SOFn segment; refuses what no decoder here takes."""
    if len(body) < 6:
        raise ImageDecodeError("truncated JPEG frame header (SOF)")
    precision, height, width, components = struct.unpack_from(">BHHB", body)
    if precision != 8:
        raise ImageDecodeError(f"unsupported JPEG data precision {precision} (only 8-bit)")
    if components not in _JPEG_MODES:
        raise ImageDecodeError(f"unsupported JPEG with {components} components")
    return width, height, _JPEG_MODES[components], marker in _PROGRESSIVE


def _jpeg_header(data: bytes) -> Header:
    """SOFn gives the size (one frame header only: libjpeg refuses a second), APP1 the EXIF
    (Pillow joins several) and XMP (the last one), APP0 whether Pillow reads dpi from JFIF."""
    frame, exif, xmp, jfif_dpi = None, None, None, False
    for marker, start, end in _jpeg_segments(data):
        body = data[start:end] if marker in _SOF_MARKERS or marker in (0xE0, 0xE1) else b""
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise ImageDecodeError("JPEG has two frame headers (SOF)")
            frame = _jpeg_frame(body, marker)
        elif marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            exif = bytes(body) if exif is None else exif + bytes(body[6:])
        elif marker == 0xE1 and body[:len(_XMP_PREFIX)] == _XMP_PREFIX:
            xmp = bytes(body[len(_XMP_PREFIX):])
        elif marker == 0xE0 and body[:4] == b"JFIF" and len(body) >= 12 and body[7] in (1, 2):
            jfif_dpi = True
    if frame is None:
        raise ImageDecodeError("JPEG has no frame header (SOF)")
    width, height, mode, progressive = frame
    return Header("jpeg", width, height, _jpeg_orientation(exif, xmp, jfif_dpi), mode,
                  progressive=progressive)


def _jpeg_orientation(exif: bytes | None, xmp: bytes | None, jfif_dpi: bool) -> int:
    """Pillow's orientation for a JPEG. EXIF Pillow cannot parse makes ``exif_transpose``
    raise when the JFIF header gave the dpi; otherwise ``open`` already tried it (for dpi)
    and the image counts as unrotated."""
    try:
        return _orientation(exif, xmp)
    except Exception as exc:
        if jfif_dpi:
            raise ImageDecodeError(f"unreadable EXIF: {exc}") from exc
        return 1


# -- PNG orientation: the chunks Pillow reads before IDAT and, on load(), after it -----------------
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_CHUNK_TYPE = re.compile(rb"\w{4}")  # Pillow's is_cid
_PNG_KEYS = (b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp")
_MAX_TEXT_CHUNK = 1 << 20  # Pillow's PngImagePlugin.MAX_TEXT_CHUNK (ImageFile.SAFEBLOCK)
_MAX_TEXT_MEMORY = 64 * _MAX_TEXT_CHUNK


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, body end) of each chunk in file order, up to IEND (a run of IDAT
    chunks yields its first only: it runs per sample). Stops at a chunk that runs past the
    data or has a bad type (Pillow stops or fails there)."""
    pos, n, previous = 8, len(data), b""
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end > n or kind == b"IEND" or not (kind.isalnum() or _PNG_CHUNK_TYPE.fullmatch(kind)):
            return
        if kind != previous or kind != b"IDAT":
            yield kind, pos + 8, end
        previous, pos = kind, end + 4


def _png_header(data: bytes) -> Header:
    """One walk over the chunks as Pillow reads them on ``open`` and ``load``: the last IHDR
    before the image data gives size and mode; the image data starts at the first IDAT/fdAT
    after an IHDR of a known mode (Pillow passes over earlier ones); tRNS before it means
    transparency; eXIf and text chunks anywhere give the orientation, except past an
    animated PNG's second frame (``load`` stops there)."""
    size, mode, alpha, animated, in_image, metadata = None, "", False, False, False, []
    for kind, start, end in _png_chunks(data):
        if kind == b"IHDR" and not in_image:
            size, mode = _png_ihdr(data[start:end], mode)
        elif kind in (b"IDAT", b"fdAT") and mode:
            in_image = True
        elif kind == b"tRNS" and not in_image and mode:
            alpha = True
        elif kind == b"acTL":
            animated = True
        elif kind == b"fcTL" and animated and in_image:
            break
        elif kind == b"eXIf" or kind in _PNG_TEXT:
            metadata.append((kind, bytes(data[start:end])))
    if size is None:
        raise ImageDecodeError("PNG has no IHDR chunk before its image data")
    return Header("png", size[0], size[1], _png_orientation(metadata), mode,
                  alpha or mode in ("LA", "RGBA"), animated=animated)


#: Pillow's mode per (bit depth, colour type) of a PNG (PngImagePlugin._MODES).
_PNG_MODES = {(1, 0): "1", (2, 0): "L", (4, 0): "L", (8, 0): "L", (16, 0): "I;16", (8, 2): "RGB",
              (16, 2): "RGB", (1, 3): "P", (2, 3): "P", (4, 3): "P", (8, 3): "P", (8, 4): "LA",
              (16, 4): "RGBA", (8, 6): "RGBA", (16, 6): "RGBA"}


def _png_ihdr(body: bytes, mode: str) -> tuple[tuple[int, int], str]:
    """(size, mode) from an IHDR as Pillow reads it: an unknown depth/type keeps the mode before."""
    if len(body) < 13:
        raise ImageDecodeError("truncated PNG IHDR chunk")
    width, height, depth, colour, _, filter_method = struct.unpack_from(">IIBBBB", body)
    if filter_method:
        raise ImageDecodeError("unknown PNG filter method")
    return (width, height), _PNG_MODES.get((depth, colour), mode)


def _inflate(body: bytes) -> bytes | None:
    """zlib text as Pillow inflates it: at most 1 MiB; None for a broken stream."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(body, _MAX_TEXT_CHUNK)
    except zlib.error:
        return None
    if inflater.unconsumed_tail:
        raise ImageDecodeError("PNG text chunk inflates past 1 MiB")
    return text


def _png_text(kind: bytes, body: bytes) -> tuple[bytes, bytes | str, bytes | None] | None:
    """(key, value as Pillow stores it in ``info``, XMP bytes from iTXt) of a text chunk
    whose key matters for orientation (key ``b""``: store nothing); None for the others."""
    key, _, value = body.partition(b"\x00")
    if key not in _PNG_KEYS:
        return None
    if kind == b"tEXt":
        return key, value if key == b"exif" else value.decode("latin-1"), None
    if kind == b"zTXt":
        if value[:1] not in (b"", b"\x00"):
            raise ImageDecodeError("unknown compression method in PNG zTXt chunk")
        return key, (_inflate(value[1:]) or b"").decode("latin-1"), None
    return _png_itxt(key, value)


def _png_itxt(key: bytes, value: bytes) -> tuple[bytes, str, bytes | None] | None:
    """An iTXt chunk as Pillow reads it: XMP keeps its bytes even when they are not UTF-8."""
    if len(value) < 2:
        return None
    compressed, method, parts = value[0], value[1], value[2:].split(b"\x00", 2)
    if len(parts) < 3 or (compressed and method):
        return None
    text = _inflate(parts[2]) if compressed else parts[2]
    if text is None:
        return None
    xmp = text if key == b"XML:com.adobe.xmp" else None
    try:
        parts[0].decode("utf-8"), parts[1].decode("utf-8")
        return key, text.decode("utf-8"), xmp
    except UnicodeError:
        return (b"", "", xmp) if xmp is not None else None


def _png_orientation(metadata: list[tuple[bytes, bytes]]) -> int:
    """Orientation as ``exif_transpose`` finds it on a loaded PNG, from its eXIf and text
    chunks in file order: the last ``eXIf`` or text ``exif``, else ImageMagick's hex "Raw
    profile type exif", then XMP (text, else iTXt bytes)."""
    info: dict[bytes, bytes | str] = {}
    xmp_bytes, text_memory = None, 0
    for kind, body in metadata:
        if kind == b"eXIf":
            info[b"exif"] = b"Exif\x00\x00" + body
            continue
        parsed = _png_text(kind, body)
        if parsed is None:
            continue
        key, value, xmp = parsed
        xmp_bytes = xmp if xmp is not None else xmp_bytes
        if key:
            info[key] = value
            text_memory += len(value)
        if text_memory > _MAX_TEXT_MEMORY:
            raise ImageDecodeError("PNG text chunks past 64 MiB")
    exif = info.get(b"exif")
    if exif is None and b"Raw profile type exif" in info:
        try:
            exif = bytes.fromhex("".join(str(info[b"Raw profile type exif"]).split("\n")[3:]))
        except ValueError as exc:
            raise ImageDecodeError(f"unreadable PNG raw EXIF profile: {exc}") from exc
    try:
        return _orientation(exif, info.get(b"XML:com.adobe.xmp") or xmp_bytes)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"unreadable PNG EXIF: {exc}") from exc


# -- Pillow ----------------------------------------------------------------------------------
_pillow_limit_lock = threading.Lock()


def _open_pillow(data: bytes, fmt: str | None = None) -> Image.Image:
    """Pillow's lazy open, restricted to the sniffed format's plugin. Our own limits are
    enforced from the header; Pillow's would fire first on open(), so it is off meanwhile
    (under a lock: it is a process-wide setting)."""
    fmt = fmt or sniff_format(data)
    if fmt not in _PILLOW_FORMATS:
        raise ImageDecodeError("not a recognised image format (JPEG, PNG, GIF, WebP, BMP or TIFF)")
    with _pillow_limit_lock:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]])
        except MemoryError:
            raise
        except Exception as exc:
            raise ImageDecodeError(f"cannot identify image: {exc}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _needs_compositing(im: Image.Image) -> bool:
    """transformers' ``convert_to_rgb`` composites onto white; only alpha or transparency changes pixels."""
    return not {"A", "a"}.isdisjoint(im.getbands()) or im.info.get("transparency") is not None


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as stored: Pillow 13 reports a TIFF's size already oriented at open
    (and orients it on load), keeping the stored one as ``_tile_size``."""
    return getattr(im, "_tile_size", None) or im.size


def _pillow_header(data: bytes, fmt: str) -> Header:
    """Header through Pillow's lazy open, which reads no pixels: size and mode are exactly what
    ``load`` will allocate; orientation through ``getexif`` (no pixels read either)."""
    with _open_pillow(data, fmt) as im:
        orientation = _transposing(im.getexif().get(_ORIENTATION_TAG, 1))
        width, height = _stored_size(im)
        return Header(fmt, width, height, orientation, im.mode, _needs_compositing(im))


#: Header readers by format: by hand where it runs per sample and Pillow's open costs 5-20x
#: more (the decoder's own header is compared with it before decoding), else Pillow's.
_HEADER_READERS = {"jpeg": _jpeg_header, "png": _png_header}


def read_header(data: bytes) -> Header:
    """Size, orientation, mode and format of encoded image bytes, without decoding pixels.

    Raises :class:`ImageDecodeError` for anything it cannot read, including an image with no
    pixels (a 0 side).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError("not a recognised image format (JPEG, PNG, GIF, WebP, BMP or TIFF)")
    try:
        header = _HEADER_READERS[fmt](data) if fmt in _HEADER_READERS else _pillow_header(data, fmt)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:  # a parser's own slip must still reach the error policy as one type
        raise ImageDecodeError(f"cannot read {fmt} header: {exc}") from exc
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(f"{fmt} image has no pixels ({header.width}x{header.height})")
    return header


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone."""
    return read_header(as_bytes(data)).size


def as_bytes(source) -> bytes:
    """Encoded bytes from bytes-like objects or file paths."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    raise TypeError(f"expected image bytes or a path, got {type(source).__name__}")


# -- memory budget -----------------------------------------------------------------------------
def _pillow_bpp(mode: str) -> int:
    """Bytes per pixel Pillow stores for a mode: 1 for 1/L/P, 2 for 16-bit gray, 4 otherwise
    (RGB included: Pillow pads it to 4)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _via_libjpeg(header: Header) -> bool:
    """JPEGs decode through libjpeg-turbo straight into RGB, except CMYK/YCCK (Pillow's)."""
    return header.format == "jpeg" and header.mode != "CMYK"


def decode_cost(header: Header) -> int:
    """Peak bytes the decode of an image holds, from its header: pixels x bytes per pixel of
    each buffer alive at once. libjpeg-turbo: the RGB output (3) and its reoriented copy (3);
    Pillow: its image in the decoded mode (``_pillow_bpp``), the RGB image it converts to (4),
    the bytes numpy copies out of it (3, built from 3 more of chunks), and RGBA plus the
    composite when alpha is composited (8); a transposed image is a second copy; libwebp
    keeps two canvases (8) and hands the frame over (4); a progressive JPEG keeps every DCT
    coefficient (2 per component). Measured peaks stay under it (benchmarks/fuzz.py --memory)."""
    if _via_libjpeg(header):
        per_pixel = 3 + (3 if header.orientation != 1 else 0)
    else:
        stored = _pillow_bpp(header.mode)
        per_pixel = stored + 10 + (8 if header.alpha else 0) + (stored if header.orientation != 1 else 0)
        per_pixel += 12 if header.format == "webp" else 0
    if header.progressive:
        per_pixel += 2 * _JPEG_COMPONENTS.get(header.mode, 4)
    return header.width * header.height * per_pixel


def check_pixels(header: Header, limit: int | None) -> None:
    """Refuses an image over ``limit`` pixels, or whose decode would need more than
    ``MAX_IMAGE_BYTES`` (read at call time, so setting it takes effect at once). ``limit=None``
    means trusted input: both checks are off."""
    if limit is None:
        return
    pixels = header.width * header.height
    if pixels > limit:
        raise DecompressionBombError(
            f"image is {header.width}x{header.height} = {pixels} pixels, "
            f"over the limit of {limit} (possible decompression bomb)")
    budget = MAX_IMAGE_BYTES
    if budget is not None and decode_cost(header) > budget:
        raise DecompressionBombError(
            f"decoding this {header.width}x{header.height} {header.mode} {header.format} needs about "
            f"{decode_cost(header) >> 20} MiB, over the per-image budget of {budget >> 20} MiB "
            f"(possible decompression bomb; fastload.header.MAX_IMAGE_BYTES, FASTLOAD_MAX_IMAGE_BYTES)")



@dataclass(frozen=True)
class ParsedImage:
    """Encoded image bytes with their header, read once and checked against the limits.

    Token counting, the image processor and the decoder all need the header; carrying it
    from the first reader to the last means each image's header is parsed (and bomb-checked)
    once per sample instead of once per stage. Build one with :func:`parse_image`, which
    checks the limits: a ``ParsedImage`` is trusted to have passed them."""

    data: bytes
    header: Header


def parse_image(source, max_pixels: int | None = MAX_IMAGE_PIXELS) -> ParsedImage:
    """Reads the header of image bytes (or a path) and checks it against ``max_pixels`` and
    ``MAX_IMAGE_BYTES`` (see :func:`check_pixels`); a ``ParsedImage`` is returned as it is."""
    if isinstance(source, ParsedImage):
        return source
    data = as_bytes(source)
    header = read_header(data)
    check_pixels(header, max_pixels)
    return ParsedImage(data, header)
