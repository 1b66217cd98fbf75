"""Fuzzing what fastload reads from untrusted bytes: tar shards, image headers, decode + kernel.

    .venv/bin/python benchmarks/fuzz.py --cases 100000 --jobs 2 --seed 0 --out /tmp/fastload-fuzz
    .venv/bin/python benchmarks/fuzz.py --replay tests/fuzz_regressions   # one outcome per file
    .venv/bin/python benchmarks/fuzz.py --memory                          # decode_cost vs measured peaks

Cases are seeded mutations of small, valid inputs made here (no ../shared needed): bit
flips, interesting 8/16/32-bit values, cuts, duplications, and inserted structures of each
format (PNG chunks with valid CRCs, JPEG segments, EXIF IFDs, XMP, pax records, base-256
sizes), with checksums optionally fixed so that mutations get past them. A case is
``(seed, index)``, so any failure can be regenerated, and every failing input is written out.

Every case runs in a :class:`Sandbox`: a forked child with ``RLIMIT_AS`` at its own size +
2 GiB and a 10 s timeout per case, restarted after a crash, hang or blow-up, so none of
them can take the run down. Outcomes (``FAILURES`` must stay at 0):

- crash: the child died (signal or exit); hang: a case ran past the timeout;
- memory: the case's peak RSS grew by more than 1 GB, or a ``MemoryError``;
- escaped: an exception that is not a documented one (images: ``ImageDecodeError`` and its
  ``DecompressionBombError``, and ``smart_resize``'s aspect-ratio ``ValueError`` that
  transformers raises too; tars: ``ShardError``/``ValueError``);
- mismatch: the header's size differs from the decoded size, or the processor's grid
  from the token count of the header, without an exception;
- wrong: decoded without error but with other pixels than Pillow + transformers'
  ``convert_to_rgb`` after ``exif_transpose`` (the reference pipeline).

Informational: ok (same as the reference), refused (a documented exception where the
reference fails too, or is refused by its own bomb limit), stricter (a documented
exception where the reference decodes), lenient (decoded where the reference fails).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
import random
import resource
import signal
import struct
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAILURES = ("crash", "hang", "memory", "escaped", "mismatch", "wrong")
INFO = ("ok", "refused", "stricter", "lenient")
TIMEOUT_S = 10.0
ADDRESS_SPACE = 2 << 30  # RLIMIT_AS headroom over the child's own size
MEMORY_LIMIT = 1_000_000_000  # peak RSS growth of one case
REFERENCE_MAX_PIXELS = 1 << 22  # Pillow refuses references over 2x this itself

Draw = Callable[[int, int], int]  # draw(lo, hi): an integer in [lo, hi], from random or hypothesis


# -- seeds: small valid inputs of every kind ---------------------------------------------------
def _tiff_ifd(orientation: int, endian: str = "<", typ: int = 3, count: int = 1) -> bytes:
    """A TIFF-structured EXIF block whose IFD0 holds one orientation entry."""
    prefix = b"II*\x00" if endian == "<" else b"MM\x00*"
    value = struct.pack(endian + "H", orientation).ljust(4, b"\x00")
    return prefix + struct.pack(endian + "IH", 8, 1) + struct.pack(endian + "HHI", 0x0112, typ, count) + value + b"\x00" * 4


def _exif(ifd: bytes) -> bytes:
    """An EXIF block as ``Image.save(exif=...)`` takes it (JPEG needs the prefix)."""
    return b"Exif\x00\x00" + ifd


def _xmp(orientation: int, attribute: bool = True) -> bytes:
    tag = f'tiff:Orientation="{orientation}"' if attribute else f"<tiff:Orientation>{orientation}</tiff:Orientation>"
    return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description {tag if attribute else ""}>'
            f'{"" if attribute else tag}</rdf:Description></rdf:RDF></x:xmpmeta>').encode()


def _pixels(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * channels).reshape(h, w, channels)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _save(im, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def image_seeds() -> list[bytes]:
    """Small images of every format, mode and metadata layout the readers handle."""
    from PIL import Image

    rgb = Image.fromarray(_pixels(13, 21, 3, 1))
    rgba = Image.fromarray(_pixels(17, 11, 4, 2), "RGBA")
    gray = rgb.convert("L")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif6 = Image.Exif()
    exif6[0x0112] = 6
    seeds = [
        _save(rgb, "JPEG", quality=80), _save(rgb, "JPEG", subsampling=0, quality=95),
        _save(rgb, "JPEG", progressive=True), _save(gray, "JPEG"), _save(rgb.convert("CMYK"), "JPEG"),
        _save(rgb, "JPEG", exif=exif6.tobytes()), _save(rgb, "JPEG", xmp=_xmp(8)),
        _save(rgb, "JPEG", exif=_exif(_tiff_ifd(3, ">")), xmp=_xmp(6, False), progressive=True),
        _save(rgb, "PNG"), _save(rgba, "PNG"), _save(gray, "PNG"), _save(pal, "PNG", transparency=3),
        _save(rgb.convert("1"), "PNG"), _save(Image.fromarray(_pixels(9, 14, 1, 3)[..., 0].astype(np.uint16) * 200), "PNG"),
        _save(rgb, "PNG", exif=exif6.tobytes()), _save(rgba, "PNG", optimize=True, interlace=True),
        _png_with_text(rgb), _save(rgb.convert("LA"), "PNG"),
        _save(pal, "GIF"), _save(pal, "GIF", transparency=2, save_all=True, append_images=[pal.rotate(90)]),
        _save(rgb, "WEBP", quality=70), _save(rgba, "WEBP", lossless=True), _save(rgb, "WEBP", exif=exif6.tobytes()),
        _save(rgb, "BMP"), _save(pal, "BMP"), _save(rgba, "BMP"),
        _save(rgb, "TIFF"), _save(rgb, "TIFF", compression="tiff_deflate", exif=exif6.tobytes()),
        _save(gray, "TIFF", compression="tiff_lzw"), _save(rgba, "TIFF"),
    ]
    return seeds


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_text(im) -> bytes:
    """A PNG carrying orientation in ImageMagick's raw profile and in iTXt XMP."""
    data = _save(im, "PNG")
    raw = _tiff_ifd(8)
    profile = b"Raw profile type exif\x00\nexif\n" + f"{len(raw):8}\n".encode() + raw.hex().encode() + b"\n"
    xmp = b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(_xmp(3))
    return data[:33] + _png_chunk(b"tEXt", profile) + _png_chunk(b"iTXt", xmp) + data[33:]


def tar_seeds() -> list[bytes]:
    """Shards of two or three samples in each tar dialect, with long names and a gzip one."""
    seeds = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            for i, name in enumerate(["a", "b" * (60 if fmt == tarfile.USTAR_FORMAT else 120), "c"]):
                for ext, body in (("jpg", b"\xff\xd8\xff" + bytes(40 + i)), ("json", b'{"i": %d}' % i)):
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(body)
                    if fmt == tarfile.PAX_FORMAT:
                        info.pax_headers = {"comment": "x" * 30}
                    tar.addfile(info, io.BytesIO(body))
        seeds.append(out.getvalue())
    seeds.append(_gzip(seeds[0]))
    return seeds


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


# -- mutations ---------------------------------------------------------------------------------
_INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFF)
_INTERESTING_16 = (0, 1, 2, 0x7FFF, 0x8000, 0xFFFF, 9000, 20000)
_INTERESTING_32 = (0, 1, 2, 12, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 9000, 9900, 20000, 65536, 100_000)


def _pick(draw: Draw, options):
    return options[draw(0, len(options) - 1)]


def boundaries(data: bytes) -> list[int]:
    """Where structures start (PNG chunks, JPEG segments, RIFF chunks, tar blocks): positions
    where an inserted structure is read as one."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        out, pos = [], 8
        while pos + 8 <= len(data):
            out.append(pos)
            pos += 12 + struct.unpack_from(">I", data, pos)[0]
        return out + [len(data)]
    if data[:2] == b"\xff\xd8":
        return [i for i in range(2, min(len(data), 4096)) if data[i] == 0xFF and data[i + 1:i + 2] not in (b"\x00", b"")] or [2]
    if data[:4] == b"RIFF":
        out, pos = [], 12
        while pos + 8 <= len(data):
            out.append(pos)
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0] + (struct.unpack_from("<I", data, pos + 4)[0] & 1)
        return out + [len(data)]
    if _is_tar(data):
        return list(range(0, len(data) + 1, 512))
    return [0, len(data)]


def _is_tar(data: bytes) -> bool:
    return data[257:262] == b"ustar"


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def structures(draw: Draw, data: bytes) -> bytes:
    """A structure of the input's own format, built with drawn field values."""
    v16, v32 = _pick(draw, _INTERESTING_16), _pick(draw, _INTERESTING_32)
    orient, endian = draw(0, 9), _pick(draw, "<>")
    ifd = _tiff_ifd(orient, endian, _pick(draw, (3, 3, 4, 5, 7, 1, 99)), _pick(draw, (1, 1, 2, 0, 0xFFFF)))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _pick(draw, (
            lambda: _png_chunk(b"IHDR", struct.pack(">IIBBBBB", v32 % 30000, _pick(draw, _INTERESTING_32) % 30000,
                                                    _pick(draw, (1, 8, 16)), _pick(draw, (0, 2, 3, 4, 6)), 0, 0, 0)),
            lambda: _png_chunk(b"eXIf", ifd),
            lambda: _png_chunk(b"tEXt", b"XML:com.adobe.xmp\x00" + _xmp(orient)),
            lambda: _png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + _xmp(orient, False)),
            lambda: _png_chunk(b"zTXt", b"exif\x00\x00" + zlib.compress(ifd)),
            lambda: _png_chunk(b"tEXt", b"Raw profile type exif\x00\nexif\n      %d\n" % len(ifd) + ifd.hex().encode()),
            lambda: _png_chunk(b"tRNS", bytes(draw(0, 8))),
            lambda: _png_chunk(b"acTL", struct.pack(">II", draw(0, 3), 0)),
            lambda: _png_chunk(b"IDAT", zlib.compress(bytes(draw(0, 64)))),
            lambda: _png_chunk(b"IEND", b""),
        ))()
    if data[:2] == b"\xff\xd8":
        return _pick(draw, (
            lambda: _jpeg_segment(_pick(draw, (0xC0, 0xC1, 0xC2, 0xC3, 0xDE)), struct.pack(">BHHB", _pick(draw, (8, 8, 12, 0)), v16, _pick(draw, _INTERESTING_16), _pick(draw, (1, 3, 4, 2))) + b"\x11\x11\x00" * 4),
            lambda: _jpeg_segment(0xE1, b"Exif\x00\x00" + ifd),
            lambda: _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + _xmp(orient, draw(0, 1) == 1)),
            lambda: _jpeg_segment(0xE0, b"JFIF\x00\x01\x01" + bytes([draw(0, 2)]) + b"\x00\x48\x00\x48\x00\x00"),
            lambda: _jpeg_segment(0xE2, b"MPF\x00" + ifd),
            lambda: bytes([0xFF, _pick(draw, (0x01, 0xD0, 0xD8, 0xD9, 0xF0, 0xFF, 0x00, 0x02))]),
            lambda: bytes([0xFF, 0xE1]) + struct.pack(">H", v16),
        ))()
    if data[:4] == b"RIFF":
        return _pick(draw, (
            lambda: b"VP8X" + struct.pack("<I", 10) + bytes([_pick(draw, (0, 8, 0x10, 0x18))]) + b"\x00" * 3 + struct.pack("<I", v32)[:3] + struct.pack("<I", v32)[:3],
            lambda: b"EXIF" + struct.pack("<I", len(ifd)) + ifd + b"\x00" * (len(ifd) & 1),
            lambda: b"XMP " + struct.pack("<I", len(_xmp(orient))) + _xmp(orient) + b"\x00" * (len(_xmp(orient)) & 1),
        ))()
    if _is_tar(data):
        return _tar_structure(draw, v32)
    return ifd


def _tar_structure(draw: Draw, v32: int) -> bytes:
    """A tar header block (pax record, GNU long name, base-256 size) or a zero block."""
    info = tarfile.TarInfo("x" * draw(1, 200) + ".jpg")
    info.size = draw(0, 64)
    kind = draw(0, 4)
    if kind == 0:
        return bytes(512)
    if kind == 1:
        record = _pick(draw, (b"0 path=a\n", b"-5 path=a\n", b"%d path=%s\n" % (v32, b"a" * 4), b"999999999999 x=\n"))
        info.name, info.type, info.size = "PaxHeader", tarfile.XHDTYPE, len(record)
        return info.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\x00")
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT)[-512:])
    if kind == 2:  # GNU base-256 size
        block[124:136] = b"\x80" + bytes(3) + struct.pack(">Q", (v32 << draw(0, 40)) & (2 ** 64 - 1))
    elif kind == 3:
        block[124:136] = _pick(draw, (b"77777777777\x00", b"-1\x00" + bytes(9), b"\xff" * 12))
    return bytes(block)


def _set_int(draw: Draw, data: bytearray, size: int) -> None:
    pos = draw(0, max(0, len(data) - size))
    value = _pick(draw, _INTERESTING_16 if size == 2 else _INTERESTING_32) if draw(0, 3) else draw(0, (1 << (8 * size)) - 1)
    data[pos:pos + size] = value.to_bytes(size, _pick(draw, ("big", "little")))[-size:]


def mutate_once(draw: Draw, data: bytearray) -> bytearray:
    """One mutation of ``data`` (in place where it can)."""
    n = len(data)
    op = draw(0, 9)
    if op == 0 and n:
        data[draw(0, n - 1)] ^= 1 << draw(0, 7)
    elif op == 1 and n:
        data[draw(0, n - 1)] = _pick(draw, _INTERESTING_8) if draw(0, 1) else draw(0, 255)
    elif op in (2, 3) and n >= 4:
        _set_int(draw, data, 2 if op == 2 else 4)
    elif op == 4 and n > 1:
        start = draw(0, n - 1)
        del data[start:start + draw(1, 64)]
    elif op == 5 and n:
        start = draw(0, n - 1)
        piece = data[start:start + draw(1, 256)]
        at = _pick(draw, boundaries(bytes(data)))
        data[at:at] = piece
    elif op == 6 and n > 2:
        del data[draw(1, n - 1):]
    else:  # 7-9 (and the cases above on too short an input): insert a structure
        at = _pick(draw, boundaries(bytes(data)))
        data[at:at] = structures(draw, bytes(data))
    return data


def fix_checksums(data: bytes) -> bytes:
    """PNG CRCs and tar header checksums recomputed, so that mutations reach the readers
    behind them."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        out, pos = bytearray(data), 8
        while pos + 12 <= len(out):
            length = struct.unpack_from(">I", out, pos)[0]
            end = pos + 8 + length
            if end + 4 > len(out):
                break
            out[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:end])))
            pos = end + 4
        return bytes(out)
    if data[257:262] == b"ustar":
        out = bytearray(data)
        for pos in range(0, len(out) - 511, 512):
            if out[pos + 257:pos + 262] == b"ustar":
                out[pos + 148:pos + 156] = b" " * 8
                out[pos + 148:pos + 155] = b"%06o\x00" % sum(out[pos:pos + 512])
        return bytes(out)
    return data


def mutate(draw: Draw, seed: bytes) -> bytes:
    """1-4 mutations of a seed (mostly one or two), checksums fixed three times in four."""
    data = bytearray(seed)
    for _ in range(_pick(draw, (1, 1, 1, 2, 2, 3, 4))):
        data = mutate_once(draw, data)
    return fix_checksums(bytes(data)) if draw(0, 3) else bytes(data)


def random_draw(rng: random.Random) -> Draw:
    return lambda lo, hi: rng.randint(lo, hi)


def case(seed: int, index: int, seeds: list[bytes]) -> bytes:
    """The input of case ``index`` of run ``seed``: the same whatever the job count."""
    rng = random.Random(f"{seed}/{index}")
    draw = random_draw(rng)
    return mutate(draw, seeds[draw(0, len(seeds) - 1)])


# -- the oracle (runs in the sandbox child) -------------------------------------------------------
@dataclass
class Outcome:
    category: str
    detail: str = ""
    peak_mb: float = 0.0
    seconds: float = 0.0


def _documented_image_error(exc: BaseException) -> bool:
    from fastload.header import ImageDecodeError

    return isinstance(exc, ImageDecodeError) or (
        type(exc) is ValueError and "aspect ratio" in str(exc))  # smart_resize, as transformers


def _reference_rgb(data: bytes) -> np.ndarray:
    """The reference pipeline: Pillow (its own bomb limit small), exif_transpose, and
    transformers' convert_to_rgb."""
    from PIL import Image, ImageOps
    from transformers.image_transforms import convert_to_rgb

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, REFERENCE_MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(convert_to_rgb(ImageOps.exif_transpose(im)))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class _Mismatch(Exception):
    pass


def _ours(data: bytes, processors) -> np.ndarray:
    """fastload's path: header, decode (checked against the header), both processor modes
    (grid checked against the header's token count)."""
    import fastload
    from fastload.decode import decode
    from fastload.header import read_header

    header = read_header(data)
    rgb = decode(data)
    if rgb.shape[:2] != header.size[::-1]:
        raise _Mismatch(f"header {header.size}, decoded {rgb.shape[1]}x{rgb.shape[0]}")
    tokens = fastload.num_image_tokens(*header.size)
    for proc in processors:
        grid = proc(data)["image_grid_thw"][0].tolist()
        if grid[0] * grid[1] * grid[2] // 4 != tokens:
            raise _Mismatch(f"grid {grid} from the decode, {tokens} tokens from the header")
    return rgb


def check_image(data: bytes, processors) -> Outcome:
    try:
        ours = _ours(data, processors)
    except _Mismatch as exc:
        return Outcome("mismatch", str(exc))
    except MemoryError:
        return Outcome("memory", "MemoryError")
    except Exception as exc:
        if not _documented_image_error(exc):
            return Outcome("escaped", "".join(traceback.format_exception(exc))[-2000:])
        ours = exc
    try:
        reference = _reference_rgb(data)
    except Exception as exc:  # the reference failing is information, not a failure of ours
        reference = exc
    return _compare(ours, reference)


def _compare(ours, reference) -> Outcome:
    if isinstance(ours, Exception):
        if isinstance(reference, Exception):
            return Outcome("refused", f"{type(ours).__name__}: {ours}"[:300])
        return Outcome("stricter", f"{type(ours).__name__}: {ours}"[:300])
    if isinstance(reference, Exception):
        return Outcome("lenient", f"reference: {type(reference).__name__}: {reference}"[:300])
    if ours.shape != reference.shape or not np.array_equal(ours, reference):
        return Outcome("wrong", f"ours {ours.shape}, reference {reference.shape}")
    return Outcome("ok")


def check_tar(data: bytes) -> Outcome:
    """The tar reader three ways (entries, samples, ShardDataset under each policy); the
    allowed outcomes are samples or ShardError/ValueError."""
    from fastload.shards import ShardDataset, group_samples, tar_entries

    url = "fuzz.tar.gz" if data[:2] == b"\x1f\x8b" else "fuzz.tar"
    steps = [lambda: list(group_samples(tar_entries(io.BytesIO(data), url), url)),
             lambda: list(tar_entries(io.BytesIO(data), url, with_data=False))]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, url)
        with open(path, "wb") as f:
            f.write(data)
        steps += [lambda p=p: list(ShardDataset(path, on_error=p)) for p in ("raise", "skip", "warn")]
        errors = []
        for step in steps:
            try:
                step()
            except MemoryError:
                return Outcome("memory", "MemoryError")
            except ValueError as exc:
                errors.append(type(exc).__name__)
            except Exception as exc:
                return Outcome("escaped", "".join(traceback.format_exception(exc))[-2000:])
    return Outcome("refused" if errors else "ok", ",".join(sorted(set(errors))))


# -- the sandbox ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _self_test(kind: str):
    """Cases that test the sandbox itself: a segfault, an endless loop."""
    def run(data, processors):
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        while True:
            time.sleep(0.01)
    return run


#: What each kind of case runs.
CHECKS = {"image": check_image, "tar": lambda data, _: check_tar(data),
          "crash": _self_test("crash"), "hang": _self_test("hang")}


def _preload() -> None:
    """Imports every case needs: in the parent, so that each forked child has them."""
    from transformers.image_transforms import convert_to_rgb  # noqa: F401  (seconds, the first time)

    import fastload.shards  # noqa: F401
    import fastload.vision  # noqa: F401


def _child(conn, stacks: str) -> None:
    """The sandbox loop: limits set once, "ready" sent, then one outcome per case. SIGUSR1
    writes every thread's stack to ``stacks`` (what a hang was doing)."""
    import faulthandler
    import logging

    import fastload

    _preload()
    logging.disable(logging.CRITICAL)  # the "warn" policy's log lines
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    vsz = _status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vsz + ADDRESS_SPACE, resource.RLIM_INFINITY))
    processors = [fastload.Qwen2VLImageProcessor(exact=True), fastload.Qwen2VLImageProcessor()]
    faulthandler.disable()  # a crash is the parent's to report, not a stack on the terminal
    faulthandler.register(signal.SIGUSR1, file=open(stacks, "w"), all_threads=True)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, data = message
        _reset_peak()
        start, rss = time.perf_counter(), _status_kb("VmRSS")
        outcome = CHECKS[kind](data, processors)
        outcome.peak_mb = (_status_kb("VmHWM") - rss) / 1024
        outcome.seconds = time.perf_counter() - start
        if outcome.peak_mb * 1024 * 1024 > MEMORY_LIMIT and outcome.category not in FAILURES:
            outcome = Outcome("memory", f"peak +{outcome.peak_mb:.0f} MB ({outcome.category})",
                              outcome.peak_mb, outcome.seconds)
        conn.send(outcome)


class Sandbox:
    """A forked child that runs cases; a crash, hang or blow-up costs the child, not the run.
    Children are forked by a single-threaded parent (a fork amid threads can deadlock)."""

    def __init__(self, timeout: float = TIMEOUT_S):
        import multiprocessing as mp

        _preload()
        self.timeout, self._ctx, self.proc, self.started = timeout, mp.get_context("fork"), None, None

    def _start(self) -> None:
        """A new child, waited for until it is set up (imports are not a case's time)."""
        self.stacks = tempfile.NamedTemporaryFile(prefix="fastload-fuzz-", suffix=".stacks", delete=False).name
        self.conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_child, args=(child, self.stacks), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("the fuzz sandbox did not start")

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.conn.close()
            self.proc = None
            os.unlink(self.stacks)

    def _stacks(self) -> str:
        """Where the child is stuck: its threads' stacks, innermost frames kept."""
        os.kill(self.proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        with open(self.stacks) as f:
            return f.read()[-1500:]

    def submit(self, data: bytes, kind: str) -> None:
        """Starts one case: ``kind`` is "image" or "tar"."""
        if self.proc is None:
            self._start()
        self.started = time.perf_counter()
        try:
            self.conn.send((kind, data))
        except OSError:
            pass  # a dead child: collect() reports it

    def collect(self) -> Outcome:
        """The outcome of the submitted case, once its answer (or the child's end) is there."""
        try:
            outcome = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(1)
            code = self.proc.exitcode
            self._stop()
            return Outcome("crash", f"child exit code {code}", seconds=time.perf_counter() - self.started)
        if outcome.category == "memory":
            self._stop()  # a fresh child for the next case: RSS back to its start
        return outcome

    def expire(self) -> Outcome:
        """The submitted case ran past the timeout: the child goes."""
        detail = f"no answer in {self.timeout:.0f} s:\n{self._stacks()}"
        self._stop()
        return Outcome("hang", detail, seconds=time.perf_counter() - self.started)

    def deadline(self) -> float:
        return self.started + self.timeout

    def run(self, data: bytes, kind: str) -> Outcome:
        """One case, start to end."""
        self.submit(data, kind)
        return self.collect() if self.conn.poll(self.timeout) else self.expire()

    def close(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(5)
            self._stop()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the long run --------------------------------------------------------------------------------
def file_name(name: str, kind: str, data: bytes) -> str:
    """``name`` with an extension that says the case's kind (see ``kind_of_path``)."""
    from fastload.header import sniff_format

    if kind == "tar":
        return f"{name}.tar.gz" if data[:2] == b"\x1f\x8b" else f"{name}.tar"
    return f"{name}.{sniff_format(data) or 'img'}"


def kind_of_path(path: pathlib.Path) -> str:
    return "tar" if path.name.endswith((".tar", ".tar.gz")) else "image"


def save_input(out: pathlib.Path, outcome: Outcome, name: str, kind: str, data: bytes) -> None:
    folder = out / outcome.category
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name(name, kind, data)).write_bytes(data)
    (folder / f"{name}.txt").write_text(outcome.detail)


def run_cases(cases: int, seed: int, jobs: int, out: pathlib.Path | None, kinds: tuple[str, ...],
              timeout: float = TIMEOUT_S) -> dict:
    """``cases`` cases over ``jobs`` sandboxes, from one thread; counts per kind and category."""
    from multiprocessing.connection import wait

    seeds = {"image": image_seeds(), "tar": tar_seeds()}
    counts = {k: collections.Counter() for k in kinds}
    peaks, busy, todo = [], {}, iter(range(cases))
    boxes = [Sandbox(timeout) for _ in range(jobs)]

    def record(box: Sandbox, outcome: Outcome) -> None:
        i, kind, data = busy.pop(box)
        counts[kind][outcome.category] += 1
        peaks.append(outcome.peak_mb)
        if out is not None and outcome.category in FAILURES:
            save_input(out, outcome, f"{kind}-{seed}-{i}", kind, data)
        done = sum(sum(c.values()) for c in counts.values())
        if done % 5000 == 0:
            print(f"{done} cases: " + "; ".join(f"{k}: {dict(c)}" for k, c in counts.items()), file=sys.stderr, flush=True)

    try:
        while True:
            for box in boxes:
                i = next(todo, None) if box not in busy else None
                if i is not None:
                    kind = kinds[i % len(kinds)]
                    busy[box] = (i, kind, case(seed, i, seeds[kind]))
                    box.submit(busy[box][2], kind)
            if not busy:
                break
            ready = wait([b.conn for b in busy], timeout=max(0.0, min(b.deadline() for b in busy) - time.perf_counter()))
            for box in list(busy):
                if box.conn in ready:
                    record(box, box.collect())
                elif time.perf_counter() > box.deadline():
                    record(box, box.expire())
    finally:
        for box in boxes:
            box.close()
    return {"counts": {k: dict(c) for k, c in counts.items()}, "max_peak_mb": round(max(peaks, default=0.0), 1)}


def regression_inputs(folder: pathlib.Path) -> list[pathlib.Path]:
    """The inputs in a folder of regression cases (notes and READMEs left out)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix not in (".txt", ".md")]


def replay(folder: pathlib.Path) -> dict[str, Outcome]:
    """The outcome of every input in a folder (the regression cases)."""
    with Sandbox() as box:
        return {p.name: box.run(p.read_bytes(), kind_of_path(p)) for p in regression_inputs(folder)}


# -- memory calibration: decode_cost against measured peaks ------------------------------------
def memory_cases() -> list[tuple[str, bytes]]:
    """One large image per decode path whose cost model differs (about 12 MP each)."""
    from PIL import Image

    h, w = 3000, 4000
    rgb = Image.fromarray(np.repeat(_pixels(h // 10, w, 3, 5), 10, axis=0))
    exif6 = Image.Exif()
    exif6[0x0112] = 6
    images = {
        "jpeg RGB": _save(rgb, "JPEG"), "jpeg RGB progressive 4:4:4": _save(rgb, "JPEG", progressive=True, subsampling=0),
        "jpeg RGB orientation 6": _save(rgb, "JPEG", exif=exif6.tobytes()), "jpeg L": _save(rgb.convert("L"), "JPEG"),
        "jpeg CMYK": _save(rgb.convert("CMYK"), "JPEG"), "png RGB": _save(rgb, "PNG", compress_level=1),
        "png RGBA": _save(rgb.convert("RGBA"), "PNG", compress_level=1),
        "png P + tRNS": _save(rgb.convert("P"), "PNG", transparency=0, compress_level=1),
        "png L": _save(rgb.convert("L"), "PNG", compress_level=1),
        "png I;16": _save(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 200), "PNG", compress_level=1),
        "png RGB orientation 6": _save(rgb, "PNG", exif=exif6.tobytes(), compress_level=1),
        "webp RGB": _save(rgb, "WEBP", quality=50), "webp RGBA": _save(rgb.convert("RGBA"), "WEBP", quality=50),
        "gif P": _save(rgb.convert("P"), "GIF"), "bmp RGB": _save(rgb, "BMP"), "tiff RGB": _save(rgb, "TIFF"),
    }
    return list(images.items())


def measure_decode(path: str) -> int:
    """Peak RSS growth of decoding one file, in bytes (run in a fresh interpreter: memory an
    earlier case freed but kept resident would hide the growth)."""
    from fastload.decode import decode

    data = pathlib.Path(path).read_bytes()
    _reset_peak()
    rss = _status_kb("VmRSS")
    decode(data, max_pixels=None)
    return (_status_kb("VmHWM") - rss) * 1024


def memory_report() -> list[tuple[str, int, int]]:
    """(case, decode_cost, measured peak growth) per decode path, each in a new interpreter
    with glibc's mmap threshold fixed (large buffers are mapped, and returned when freed)."""
    import subprocess

    from fastload.header import decode_cost, read_header

    rows, env = [], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in memory_cases():
            path = os.path.join(tmp, "image")
            pathlib.Path(path).write_bytes(data)
            out = subprocess.run([sys.executable, __file__, "--measure-one", path], env=env,
                                 capture_output=True, text=True, check=True).stdout
            rows.append((name, decode_cost(read_header(data)), int(out.split()[-1])))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--kinds", default="image,tar", help="image,tar (cases alternate between them)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds before a case counts as a hang")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for failing inputs and results.json")
    p.add_argument("--replay", type=pathlib.Path, help="run every input in this folder once")
    p.add_argument("--memory", action="store_true", help="decode_cost against measured peaks")
    p.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_one:
        print(measure_decode(args.measure_one))
        return
    if args.memory:
        print("| image (12 MP) | decode_cost MiB | measured peak MiB | measured / cost |\n|---|---|---|---|")
        for name, cost, measured in memory_report():
            print(f"| {name} | {cost >> 20} | {measured >> 20} | {measured / cost:.2f} |")
        return
    if args.replay:
        for name, outcome in replay(args.replay).items():
            print(f"{name}: {outcome.category} {outcome.detail[:200]}")
        return
    start = time.perf_counter()
    result = run_cases(args.cases, args.seed, args.jobs, args.out, tuple(args.kinds.split(",")), args.timeout)
    result["seconds"] = round(time.perf_counter() - start, 1)
    totals = collections.Counter()
    for c in result["counts"].values():
        totals.update(c)
    result["failures"] = {k: totals.get(k, 0) for k in FAILURES}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
