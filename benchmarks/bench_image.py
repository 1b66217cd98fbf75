"""ms per image, single thread: fastload (exact, fast, bf16, uint8 wire) vs transformers' image
processor (PIL decode + its default torchvision backend where torchvision is installed, and + its
PIL backend) vs the floor (libjpeg-turbo full decode alone).

    PYTHONPATH=. .venv-tv/bin/python benchmarks/bench_image.py   (.venv: the PIL column only)
"""
from __future__ import annotations

import io
import random
import statistics
import time

import numpy as np

import simplejpeg
import torch
from PIL import Image
import fastload
from fastload.baseline import pil_decode

from common import PHOTOS, PROCESSOR, baseline_note, machine, need_shared, table, transformers_image_processors

SIZES = [(640, 480), (1280, 720), (1920, 1080), (4032, 3024)]
REPEAT = 15
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


def contenders(refs: dict, variants: dict, data: bytes) -> dict:
    """What is timed, per photo: name -> callable."""
    exact, fast = variants["exact f32"], variants["fast f32"]
    reused = np.empty(exact(data)["pixel_values"].shape, np.float32)
    return {
        "decode floor": lambda: simplejpeg.decode_jpeg(data, "RGB"),
        **{name: (lambda r=ref: r(pil_decode(data), return_tensors="pt")) for name, ref in refs.items()},
        **{name: (lambda p=proc: p(data)) for name, proc in variants.items()},
        # The loader's case: patches written into a reused buffer (its shared-memory slots),
        # without the page faults of a fresh multi-megabyte output on every call.
        "exact f32 out=": lambda: exact(data, out=reused),
        "fast uint8 wire": lambda: fast.resized(data),
    }


def interleaved_ms(fns: dict, repeat: int, rng: random.Random) -> dict:
    """Median ms per callable, timed round-robin so that the machine's noise hits all alike.
    The order is shuffled every round: whoever runs right after transformers finds the heap
    trimmed by its frees and pays page faults for a fresh output; that should not always be
    the same contender."""
    for _ in range(3):  # warm: first calls fault in pools, heaps and caches
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name in rng.sample(list(fns), len(fns)):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    need_shared()
    torch.set_num_threads(1)
    print(f"machine: {machine()}; torch {torch.__version__}; single thread; median of {REPEAT} round-robin runs "
          f"(shuffled), median over {len(SOURCES)} photos per size\n{baseline_note()}\n")
    rng = random.Random(0)
    for max_pixels in (12845056, 1003520):
        refs = transformers_image_processors(PROCESSOR, max_pixels)
        variants = {
            "exact f32": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels, exact=True),
            "fast f32": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels),
            "fast bf16": fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=max_pixels,
                                                                        dtype=torch.bfloat16),
        }
        rows = []
        for size in SIZES:
            per_photo = [interleaved_ms(contenders(refs, variants, d), REPEAT, rng) for d in photos_at(size)]
            ms = {name: statistics.median(p[name] for p in per_photo) for name in per_photo[0]}
            floor = ms["decode floor"]
            rows.append([f"{size[0]}x{size[1]}", *ms.values(), *(ms[r] / ms["exact f32"] for r in refs),
                         *(ms[r] / ms["fast f32"] for r in refs),
                         ms["exact f32"] / floor, ms["exact f32 out="] / floor, ms["fast uint8 wire"] / floor,
                         ms["fast f32"] / floor])
        short = {r: r.removeprefix("transformers (").rstrip(")") for r in refs}
        headers = ["size", *ms.keys(), *(f"{short[r]}/exact" for r in refs), *(f"{short[r]}/fast" for r in refs),
                   "exact/floor", "exact out=/floor", "wire/floor", "fast/floor"]
        print(f"max_pixels={max_pixels} (ms per image)")
        print(table(headers, rows))
        first = len(ms) + 1
        for i, r in enumerate(refs):
            exact_x = statistics.median(row[first + i] for row in rows)
            fast_x = statistics.median(row[first + len(refs) + i] for row in rows)
            print(f"median speed-up over {r}: exact f32 {exact_x:.1f}x, fast f32 {fast_x:.1f}x")
        print()


if __name__ == "__main__":
    main()
