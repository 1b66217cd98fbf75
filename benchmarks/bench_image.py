"""ms per image, single thread: fastload (exact, fast, bf16, uint8 wire) vs transformers' processor
(PIL decode + Qwen2VLImageProcessorPil) vs the floor (libjpeg-turbo full decode alone).

    python benchmarks/bench_image.py
"""
from __future__ import annotations

import io
import statistics

import numpy as np

import simplejpeg
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import fastload
from fastload.baseline import pil_decode

from common import PHOTOS, PROCESSOR, machine, median_ms, need_shared, table

SIZES = [(640, 480), (1280, 720), (1920, 1080), (4032, 3024)]
SOURCES = ["Origamis.jpg", "unireco_bird_example.jpg", "ocr_example2.jpg"]


def photos_at(size: tuple[int, int]) -> list[bytes]:
    """Three real photos, resized (cover + centre crop) to ``size`` and re-encoded at quality 92."""
    out = []
    for name in SOURCES:
        im = Image.open(PHOTOS / name).convert("RGB")
        scale = max(size[0] / im.width, size[1] / im.height)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        left, top = (im.width - size[0]) // 2, (im.height - size[1]) // 2
        buf = io.BytesIO()
        im.crop((left, top, left + size[0], top + size[1])).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def main() -> None:
    need_shared()
    torch.set_num_threads(1)
    print(f"machine: {machine()}; single thread; median of 5 runs, median over {len(SOURCES)} photos per size\n")
    for max_pixels in (12845056, 1003520):
        ref = Qwen2VLImageProcessorPil.from_pretrained(PROCESSOR, max_pixels=max_pixels)
        variants = {
            "exact f32": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels, exact=True),
            "fast f32": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels),
            "fast bf16": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels,
                                                                        dtype=torch.bfloat16),
        }
        rows = []
        for size in SIZES:
            datas = photos_at(size)
            ms = {}
            ms["decode floor"] = statistics.median(median_ms(lambda d=d: simplejpeg.decode_jpeg(d, "RGB")) for d in datas)
            ms["transformers"] = statistics.median(
                median_ms(lambda d=d: ref(pil_decode(d), return_tensors="np"), repeat=3) for d in datas)
            for name, proc in variants.items():
                ms[name] = statistics.median(median_ms(lambda d=d, p=proc: p(d)) for d in datas)
            # The loader's case: patches written into a reused buffer (its shared-memory slots),
            # without the page faults of a fresh multi-megabyte output on every call.
            exact = variants["exact f32"]
            ms["exact f32 out="] = statistics.median(
                median_ms(lambda d=d, o=np.empty(exact(d)["pixel_values"].shape, np.float32): exact(d, out=o))
                for d in datas)
            wire = variants["fast f32"]
            ms["fast uint8 wire"] = statistics.median(median_ms(lambda d=d: wire.resized(d)) for d in datas)
            rows.append([f"{size[0]}x{size[1]}", *[ms[k] for k in ms],
                         ms["transformers"] / ms["exact f32"], ms["exact f32"] / ms["decode floor"],
                         ms["exact f32 out="] / ms["decode floor"], ms["fast uint8 wire"] / ms["decode floor"],
                         ms["fast f32"] / ms["decode floor"]])
        headers = ["size", *ms.keys(), "tf/exact", "exact/floor", "exact out=/floor", "wire/floor", "fast/floor"]
        print(f"max_pixels={max_pixels} (ms per image)")
        print(table(headers, rows))
        speedups = [r[-5] for r in rows]
        print(f"median speed-up of exact f32 over transformers: {statistics.median(speedups):.1f}x\n")


if __name__ == "__main__":
    main()
