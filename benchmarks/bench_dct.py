"""Fast mode's DCT scaling: power-of-two factors only (fastload's choice) vs any M/8 (the smallest
factor libjpeg-turbo offers whose output still covers the resize target), per source size and
pixel budget. ms per image, single thread, the variants timed round-robin (interleaved) so that
the machine's noise hits all alike; ratios are medians of per-round ratios. PSNR is each
variant's resized uint8 image (decode, then the kernel's fast resize) against the exact
pipeline's (full accurate decode, Pillow's bicubic: transformers' pixels).

    python benchmarks/bench_dct.py            # 12, 4, 2 MP from a real photo + the real photos; 1 and 0.2 MP budgets
    python benchmarks/bench_dct.py --rounds 3 --budgets 1003520      # smoke run
"""
from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import time

import numpy as np
from PIL import Image

import fastload
from fastload.decode import DCT_SCALES, LIBJPEG_SCALES, decode, decode_jpeg_scaled, dct_scale
from fastload.header import parse_image
from fastload.vision import resize_rgb

from common import PHOTOS, machine, need_shared, table

SOURCE = "Origamis.jpg"  # 4080x3072, 12.5 MP camera photo
RESIZED_MP = (4.0, 2.0)


def sources() -> list[tuple[str, bytes]]:
    """(name, JPEG bytes): the 12 MP photo as shot, re-encoded at 4 and 2 MP (quality 90, 4:2:0,
    Pillow's defaults), and every other real JPEG photo as it is."""
    original = (PHOTOS / SOURCE).read_bytes()
    out = [(f"{SOURCE} 12 MP", original)]
    im = Image.open(io.BytesIO(original)).convert("RGB")
    for mp in RESIZED_MP:
        s = math.sqrt(mp * 1e6 / (im.width * im.height))
        buf = io.BytesIO()
        im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append((f"{SOURCE} {mp:g} MP", buf.getvalue()))
    for path in sorted(PHOTOS.iterdir()):
        data = path.read_bytes()
        if path.name != SOURCE and data[:3] == b"\xff\xd8\xff":
            out.append((path.name, data))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12))


def one_case(data: bytes, budget: int, rounds: int, rng: random.Random) -> dict | None:
    """Timings and PSNR of one (source, budget); None when both rules pick the same factor."""
    parsed = parse_image(data)
    config = fastload.VisionConfig(max_pixels=budget)
    th, tw = config.target_size(*parsed.header.size[::-1])
    scales = {"pow2": dct_scale(parsed.header, (th, tw), DCT_SCALES),
              "M/8": dct_scale(parsed.header, (th, tw), LIBJPEG_SCALES), "full": 8}
    if scales["pow2"] == scales["M/8"]:
        return None
    decoders = {name: (lambda m=m: decode_jpeg_scaled(data, parsed.header, m, True)) for name, m in scales.items()}
    exact = resize_rgb(np.ascontiguousarray(decode(parsed)), tw, th, True)
    times = {name: {"decode": [], "total": []} for name in decoders}
    names = list(decoders)
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            rgb = decoders[name]()
            t1 = time.perf_counter()
            resize_rgb(rgb, tw, th, False)
            t2 = time.perf_counter()
            times[name]["decode"].append(t1 - t0)
            times[name]["total"].append(t2 - t0)
    quality = {name: psnr(exact, resize_rgb(fn(), tw, th, False)) for name, fn in decoders.items() if name != "full"}

    def ratio(kind: str, a: str = "M/8", b: str = "pow2") -> float:
        return statistics.median(x / y for x, y in zip(times[a][kind][1:], times[b][kind][1:]))

    ms = {name: {kind: statistics.median(v[1:]) * 1e3 for kind, v in t.items()} for name, t in times.items()}
    return {"size": "x".join(map(str, parsed.header.size)), "target": f"{tw}x{th}", "scales": scales, "ms": ms,
            "decode ratio": ratio("decode"), "total ratio": ratio("total"),
            "pow2 / full": ratio("decode", "pow2", "full"), "psnr": quality}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per case (each variant once per round)")
    p.add_argument("--budgets", default="1003520,200704", help="comma-separated max_pixels budgets")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    need_shared()
    rng = random.Random(args.seed)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for name, data in sources():
            r = one_case(data, budget, args.rounds, rng)
            if r is None:
                continue
            ms = r["ms"]
            rows.append([name, r["size"], budget, r["target"], f"{r['scales']['pow2']}/8", f"{r['scales']['M/8']}/8",
                         ms["full"]["decode"], ms["pow2"]["decode"], ms["M/8"]["decode"],
                         r["pow2 / full"], r["decode ratio"],
                         ms["pow2"]["total"], ms["M/8"]["total"], r["total ratio"],
                         r["psnr"]["pow2"], r["psnr"]["M/8"]])
    print(f"{machine()}; {args.rounds} interleaved rounds per case; cases where both rules pick the same factor "
          "are left out")
    print(table(["source", "size", "budget", "target", "pow2", "M/8", "8/8 decode ms", "pow2 decode ms",
                 "M/8 decode ms", "pow2 / 8/8 decode", "M/8 / pow2 decode", "pow2 +resize ms", "M/8 +resize ms",
                 "M/8 / pow2 total", "pow2 PSNR dB", "M/8 PSNR dB"], rows))


if __name__ == "__main__":
    main()
