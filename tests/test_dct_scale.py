"""DCT-scaled JPEG decoding: output sizes as libjpeg-turbo computes them, the target always
covered, and fast mode's pixel values within its documented distance from transformers'."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import fastload
from fastload.decode import DCT_SCALES, LIBJPEG_SCALES, decode, decode_jpeg_scaled, dct_scale, scaled_size
from fastload.header import parse_image, read_header

from .conftest import SHARED, jpeg_bytes, photo_like, pillow_rgb

#: Sides around the 8- and 16-pixel block edges (4:2:0 MCUs are 16x16), and a few large ones.
EDGE_SIDES = (1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65)
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def encoded(height: int, width: int, subsampling: str = "4:2:0", seed: int = 0) -> bytes:
    if subsampling == "gray":
        out = io.BytesIO()
        Image.fromarray(photo_like(height, width, seed)[..., 0]).save(out, format="JPEG", quality=90)
        return out.getvalue()
    return jpeg_bytes(photo_like(height, width, seed), subsampling=SUBSAMPLING[subsampling])


@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0", "gray"])
def test_scaled_sizes_are_the_ones_libjpeg_turbo_produces(subsampling):
    """For every minimum height (then width) from 1 to the image's own, libjpeg-turbo decodes at
    the smallest factor M/8 reaching it: its output is ``scaled_size`` of the factor
    ``dct_scale`` picks for that minimum."""
    for height in EDGE_SIDES:
        width = EDGE_SIDES[(EDGE_SIDES.index(height) * 5 + 3) % len(EDGE_SIDES)]
        data = encoded(height, width, subsampling)
        header = read_header(data)
        for k in range(1, max(height, width) + 1):
            for min_hw in ((min(k, height), 1), (1, min(k, width))):
                produced = simplejpeg.decode_jpeg(data, "RGB", min_height=min_hw[0], min_width=min_hw[1]).shape[:2]
                expected = scaled_size(width, height, dct_scale(header, min_hw, LIBJPEG_SCALES))[::-1]
                assert produced == expected, (subsampling, width, height, min_hw)


@pytest.mark.parametrize("scale", LIBJPEG_SCALES)
def test_every_factor_decodes_to_its_scaled_size(scale):
    for height, width in ((1, 1), (9, 17), (33, 8), (65, 63), (601, 799), (1080, 1921)):
        for subsampling in ("4:2:0", "gray"):
            data = encoded(height, width, subsampling, seed=scale)
            rgb = decode_jpeg_scaled(data, read_header(data), scale, fast=True)
            assert rgb.shape == (math.ceil(height * scale / 8), math.ceil(width * scale / 8), 3)


def test_decode_covers_the_target_at_the_smallest_factor_that_does():
    """For targets just below, at and just above each factor's size: the decode covers the
    target, and the next smaller factor in the set would not have."""
    for height, width, orientation in ((1000, 1333, 1), (1001, 1999, 6), (63, 65, 1), (17, 4000, 8)):
        data = rotated(encoded(height, width), orientation)
        header = read_header(data)
        shown_w, shown_h = header.size
        for m in LIBJPEG_SCALES:
            w, h = scaled_size(shown_w, shown_h, m)
            for th, tw in ((h - 1, w), (h, w), (h, w + 1), (h + 1, max(1, w - 1))):
                for scales in (DCT_SCALES, LIBJPEG_SCALES):
                    chosen = dct_scale(header, (th, tw), scales)
                    smaller = [s for s in scales if s < chosen]
                    if smaller:
                        sw, sh = scaled_size(shown_w, shown_h, max(smaller))
                        assert sh < th or sw < tw, (height, width, th, tw, scales)
                rgb = decode(data, target_hw=(th, tw), fast=True)
                assert rgb.shape[0] >= min(th, shown_h) and rgb.shape[1] >= min(tw, shown_w)
                assert rgb.shape[:2] == scaled_size(shown_w, shown_h, dct_scale(header, (th, tw)))[::-1]


def rotated(data: bytes, orientation: int) -> bytes:
    if orientation == 1:
        return data
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), exif=exif.tobytes())


def levels(pixel_values: np.ndarray, config: fastload.VisionConfig) -> np.ndarray:
    """Normalized patches back to 0..255 levels, channel by channel."""
    per_channel = pixel_values.reshape(len(pixel_values), 3, -1)
    mean, std = np.array(config.image_mean)[:, None], np.array(config.image_std)[:, None]
    return (per_channel * std + mean) * 255


def fast_vs_transformers_psnr(images: list[bytes], processor_dir, max_pixels: int) -> tuple[float, set[int]]:
    ref = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, max_pixels=max_pixels)
    fast = fastload.Qwen2VLImageProcessor.from_pretrained(processor_dir, max_pixels=max_pixels)
    errors, used = [], set()
    for data in images:
        expected = ref(pillow_rgb(data), return_tensors="np", input_data_format="channels_last")
        got = fast(data, return_tensors="np")
        assert np.array_equal(got["image_grid_thw"], expected["image_grid_thw"])
        diff = levels(got["pixel_values"], fast.config) - levels(expected["pixel_values"], fast.config)
        errors.append(np.mean(diff ** 2))
        header = parse_image(data).header
        used.add(dct_scale(header, fast.config.target_size(*header.size[::-1])))
    return 10 * math.log10(255 ** 2 / np.mean(errors)), used


def test_fast_mode_stays_close_to_transformers_at_every_factor(processor_dir):
    """Generated photos sized so that fast mode decodes at 1/8, 1/4, 1/2 and full size: over
    them, PSNR against transformers' pixel values (PIL backend) stays >= 35 dB."""
    sizes = ((1800, 2400), (900, 1200), (450, 600), (300, 400))  # each to 168x252 at 50,176 pixels
    images = [jpeg_bytes(photo_like(h, w, seed=i), quality=92) for i, (h, w) in enumerate(sizes)]
    psnr, used = fast_vs_transformers_psnr(images, processor_dir, max_pixels=50_176)
    print(f"\nfast vs transformers, generated photos: PSNR {psnr:.1f} dB, DCT scales {sorted(used)}/8")
    assert used == set(DCT_SCALES)
    assert psnr >= 35


def test_fast_mode_on_real_photos_stays_close_to_transformers(processor_dir):
    photos = SHARED / "images" / "photos"
    if not photos.exists():
        pytest.skip(f"{photos} is absent (the ../shared data is not part of the repository)")
    images = [p.read_bytes() for p in sorted(photos.iterdir()) if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    psnr, used = fast_vs_transformers_psnr(images, processor_dir, max_pixels=1003520)
    print(f"\nfast vs transformers, {len(images)} real JPEG photos at 1 MP: PSNR {psnr:.1f} dB, "
          f"DCT scales {sorted(used)}/8")
    assert len(used) > 1 and psnr >= 35
