"""PNG decode: libspng (pyspng, fastload's PNG path) against Pillow, on the same bytes.

Interleaved rounds, best of each, as a ratio; the pixels are checked equal first. The PNGs are the
shared photos that are PNGs (cakes.png, and two PNGs under a .jpg name, one RGBA) and generated
photo-like ones at 0.25, 1 and 4 MP.

    python benchmarks/bench_png.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
from common import PHOTOS, machine, table
from PIL import Image

from fastload.decode import _decode_pillow, _decode_spng
from fastload.header import read_header


def cases() -> dict[str, bytes]:
    out = {}
    if PHOTOS.is_dir():
        for path in sorted(PHOTOS.iterdir()):
            data = path.read_bytes()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                out[path.name] = data
    rng = np.random.default_rng(0)
    for side in (512, 1024, 2048):
        gradient = np.linspace(0, 255, side, dtype=np.float32)
        image = (gradient[None, :, None] + gradient[:, None, None] * 0.5 + rng.normal(0, 6, (side, side, 3))) % 256
        buf = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buf, format="PNG")
        out[f"generated {side}x{side}"] = buf.getvalue()
    return out


def best_of_3_ms(fn) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for name, data in cases().items():
        header = read_header(data)
        assert np.array_equal(_decode_spng(data, header), _decode_pillow(data, header)), name
        pillow, spng = [], []
        for _ in range(args.rounds):  # interleaved: the same noise falls on both
            pillow.append(best_of_3_ms(lambda: _decode_pillow(data, header)))
            spng.append(best_of_3_ms(lambda: _decode_spng(data, header)))
        p, s = float(np.median(pillow)), float(np.median(spng))
        rows.append([name, f"{header.width}x{header.height} {header.mode}", f"{len(data) >> 10} KB",
                     f"{p:.1f}", f"{s:.1f}", f"{p / s:.2f}x"])
    print(machine())
    print(table(["PNG", "size, mode", "bytes", "Pillow ms", "libspng ms", "Pillow / libspng"], rows))


if __name__ == "__main__":
    main()
