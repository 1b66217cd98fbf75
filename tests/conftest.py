"""Shared fixtures: the ../shared data (skipped with a reason when absent) and references."""
from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
import pytest

from benchmarks.common import IMAGES, MLLM_DEMO, ROOT, SHARED
from benchmarks.common import PROCESSOR as PROCESSOR_DIR

NOT_IMAGES = {".md", ".json", ".txt", ""}


def need_shared(path: pathlib.Path = SHARED) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared data is not part of the repository)")
    return path


SHIPPED_PROCESSOR = ROOT / "tests" / "assets" / "qwen2_5_vl"  # the same files, in the repository


@pytest.fixture(scope="session")
def processor_dir() -> pathlib.Path:
    """The real Qwen2.5-VL processor folder: ../shared's, else the copy the tests ship."""
    return PROCESSOR_DIR if PROCESSOR_DIR.exists() else SHIPPED_PROCESSOR


@pytest.fixture(scope="session")
def mllm_demo() -> pathlib.Path:
    return need_shared(MLLM_DEMO)


def shared_images(*folders: str) -> list[pathlib.Path]:
    """Every image file under ../shared/images/<folder>, sorted."""
    need_shared(IMAGES)
    files = []
    for folder in folders:
        for p in sorted((IMAGES / folder).iterdir()):
            if p.suffix.lower() not in NOT_IMAGES and "LICENSE" not in p.name:
                files.append(p)
    return files


def pillow_rgb(data: bytes) -> np.ndarray:
    """The reference decode: Pillow, EXIF transpose, transformers' own RGB conversion (alpha
    composited onto white), none of it fastload's."""
    from PIL import Image, ImageOps
    from transformers.image_transforms import convert_to_rgb

    im = Image.open(io.BytesIO(data))
    im.load()
    return convert_to_rgb(ImageOps.exif_transpose(im), return_numpy=True)


def jpeg_bytes(array: np.ndarray, quality: int = 90, **kw) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality, **kw)
    return out.getvalue()


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random image with some edges: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).copy()
    img[height // 3: height // 3 + 2] = 255
    return img


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims ``width`` x ``height`` over 64 zero bytes of data: a
    decompression bomb's header, which nothing can decode (a decode attempt fails as truncated)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))
