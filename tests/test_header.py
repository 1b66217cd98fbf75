"""Each image's header is parsed once per sample, and the decoder still refuses a header that lies."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

import fastload
from fastload import header as header_mod
from fastload.decode import decode
from fastload.header import ImageDecodeError, ParsedImage, parse_image, read_header

from .conftest import jpeg_bytes, photo_like, pillow_rgb


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def rotated_jpeg(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return jpeg_bytes(array, exif=exif.tobytes())


def three_image_sample() -> dict:
    messages = [{"role": "user", "content": "<image><image><image>What differs?"},
                {"role": "assistant", "content": "The colours."}]
    return {"__key__": "three", "json": json.dumps({"messages": messages}).encode(),
            "0.jpg": jpeg_bytes(photo_like(300, 410, seed=1)),
            "1.png": png_bytes(photo_like(120, 90, seed=2)),
            "2.jpg": rotated_jpeg(photo_like(260, 380, seed=3))}


@pytest.fixture
def parse_counts(monkeypatch) -> dict:
    """Counts every header parse: fastload's readers by format, and libjpeg-turbo's own
    header read through simplejpeg (what the decoder did before each decode)."""
    counts = {"fastload": 0, "simplejpeg": 0}
    for fmt, reader in list(header_mod._HEADER_READERS.items()):
        def counted(data, reader=reader):
            counts["fastload"] += 1
            return reader(data)
        monkeypatch.setitem(header_mod._HEADER_READERS, fmt, counted)
    real = simplejpeg.decode_jpeg_header

    def counted_simplejpeg(*args, **kwargs):
        counts["simplejpeg"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", counted_simplejpeg)
    return counts


@pytest.mark.parametrize("mode", [{"exact": True}, {"exact": False}, {"dtype": torch.uint8}],
                         ids=["exact", "fast", "uint8 wire"])
def test_one_header_parse_per_image_per_transform_call(processor_dir, parse_counts, mode):
    """Token counting parses each header; the image processor and the decoder reuse it."""
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=200_704, **mode)
    sample = three_image_sample()
    transform.load()
    parse_counts.update(fastload=0, simplejpeg=0)
    out = transform(sample)
    assert parse_counts == {"fastload": 3, "simplejpeg": 0}
    assert out["image_grid_thw"].shape == (3, 3)
    t, h, w = out["image_grid_thw"][2].tolist()
    rgb = pillow_rgb(sample["2.jpg"])  # EXIF orientation 6: the grid follows the displayed shape
    assert (h, w) == tuple(d // 14 for d in fastload.smart_resize(*rgb.shape[:2], 28, 3136, 200_704))


def test_a_parsed_image_is_neither_parsed_nor_checked_again(parse_counts, monkeypatch):
    data = jpeg_bytes(photo_like(64, 96))
    parsed = parse_image(data)
    assert parse_counts["fastload"] == 1
    monkeypatch.setattr(header_mod, "MAX_IMAGE_BYTES", 1)  # any further budget check would refuse it
    assert parse_image(parsed) is parsed
    assert np.array_equal(decode(parsed), pillow_rgb(data))
    assert parse_counts == {"fastload": 1, "simplejpeg": 0}


@pytest.mark.parametrize("dw, dh", [(-8, 0), (0, -8), (8, 0), (0, 16)])
def test_libjpeg_refuses_a_carried_header_that_disagrees_with_the_frame(dw, dh):
    """No second header read before decoding, yet a header that lies (here: one carried with
    the wrong size) never yields pixels of another size: libjpeg-turbo writes into a buffer of
    the size the header promises, and Pillow, the reference, compares its own header."""
    data = jpeg_bytes(photo_like(120, 200))
    truth = read_header(data)
    lie = replace(truth, width=truth.width + dw, height=truth.height + dh)
    with pytest.raises(ImageDecodeError, match="header says"):
        decode(ParsedImage(data, lie))
    assert decode(ParsedImage(data, truth)).shape == (120, 200, 3)
