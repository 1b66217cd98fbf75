"""Two builds of the C++ kernel side by side in one process: same bytes out, and time per pass.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace)
    python benchmarks/compare_kernels.py /tmp/before/fastload/_kernels*.so [--rounds 60]

The other build is loaded next to this checkout's ``fastload._kernels``. First every output is compared
byte for byte (resize and the fused kernel; exact and fast; the AVX2 and the portable code; several patch
layouts; float32 and bfloat16). Then each pass and the whole kernel are timed on real photos, the two
builds alternating in a shuffled order, in thread CPU time: on a shared machine, time spent waiting for a
core would otherwise count (it doubled wall times here under other load). Ratios are new / old.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import random
import statistics
import time

import numpy as np
import simplejpeg
import torch
from bench_image import photos_at
from common import machine, need_shared

import fastload
from fastload import _kernels

LAYOUTS = ((14, 2, 2), (16, 2, 2), (14, 1, 1), (8, 3, 3), (3, 2, 2), (10, 1, 2))  # patch, temporal, merge


def load(path: str):
    loader = importlib.machinery.ExtensionFileLoader("fastload._kernels", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(loader.name, path, loader=loader))
    loader.exec_module(module)
    return module


def photo_like(h: int, w: int, rng) -> np.ndarray:
    """Smooth gradients plus noise: resizes of it exercise every tap."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(h + w - 2, 1))], -1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def same_bytes(old, new, rng) -> int:
    proc = fastload.Qwen2VLImageProcessor(exact=True)
    luts = {np.float32: proc._lut, np.uint16: proc.config.lut(torch.bfloat16)}
    checked = 0
    for simd in (True, False):
        if old.simd(simd) != simd or new.simd(simd) != simd:
            continue
        shapes = [tuple(int(v) for v in s) for s in rng.integers(1, 200, (150, 4))]
        shapes += [(1080, 1920, 728, 1316), (480, 640, 476, 644), (300, 200, 600, 150), (9, 700, 5, 31), (1, 4000, 1, 7)]
        for h, w, th, tw in shapes:
            a = photo_like(h, w, rng)
            for exact in (True, False):
                outs = [np.empty((th, tw, 3), np.uint8) for _ in range(2)]
                old.resize(a, outs[0], th, tw, exact)
                new.resize(a, outs[1], th, tw, exact)
                assert np.array_equal(*outs), ("resize", simd, exact, h, w, th, tw)
                checked += 1
        for patch, temporal, merge in LAYOUTS:
            for dtype, lut in luts.items():
                for _ in range(6):
                    th, tw = (int(v) * patch * merge for v in rng.integers(1, 12, 2))
                    a = photo_like(*(int(v) for v in rng.integers(2, 400, 2)), rng)
                    for exact in (True, False):
                        outs = [np.empty(((th // patch) * (tw // patch), 3 * temporal * patch * patch), dtype) for _ in range(2)]
                        for module, out in zip((old, new), outs):
                            module.process(a, out, lut, proc._norm, th, tw, patch, temporal, merge, exact)
                        assert np.array_equal(*outs), ("process", simd, patch, temporal, merge, dtype, exact, a.shape, th, tw)
                        checked += 1
    old.simd(True), new.simd(True)
    return checked


def cases(proc) -> dict:
    """name -> call(module): the passes alone (one-axis resizes) and the whole kernel, per photo size."""
    out = {}
    for size in ((1920, 1080), (1280, 720)):
        rgb = simplejpeg.decode_jpeg(photos_at(size)[0], "RGB")
        h, w = rgb.shape[:2]
        th, tw = proc.config.target_size(h, w)
        patches = np.empty((th * tw // 196, proc.config.patch_dim), np.float32)
        name = f"{w}x{h}"
        resizes = {"exact horizontal": (h, tw, True), "exact vertical": (th, w, True),
                   "fast8 horizontal": (h, int(w * 0.6), False), "fast8 vertical": (int(h * 0.6), w, False),
                   "fast16 horizontal": (h, int(w * 0.3), False), "fast16 vertical": (int(h * 0.3), w, False)}
        for what, (oh, ow, exact) in resizes.items():
            dst = np.empty((oh, ow, 3), np.uint8)
            out[f"{name} {what}"] = lambda m, rgb=rgb, dst=dst, oh=oh, ow=ow, exact=exact: m.resize(rgb, dst, oh, ow, exact)
        for exact in (True, False):
            out[f"{name} {'exact' if exact else 'fast'} kernel"] = (
                lambda m, rgb=rgb, th=th, tw=tw, exact=exact, patches=patches: m.process(
                    rgb, patches, proc._lut, proc._norm, th, tw, 14, 2, 2, exact))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the other build's fastload/_kernels*.so")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    need_shared()
    torch.set_num_threads(1)
    old, new = load(args.old), _kernels
    print(f"machine: {machine()}; old: {args.old}; new: {new.__file__}")
    print(f"identical outputs: {same_bytes(old, new, np.random.default_rng(0))} cases")
    timed = cases(fastload.Qwen2VLImageProcessor(exact=True, max_pixels=1003520))
    times = {name: ([], []) for name in timed}
    for _ in range(args.rounds):
        for name in random.sample(list(timed), len(timed)):
            for which in random.sample((0, 1), 2):
                module, call = (old, new)[which], timed[name]
                start = time.thread_time()
                for _ in range(3):
                    call(module)
                times[name][which].append((time.thread_time() - start) / 3 * 1e3)
    print(f"thread CPU ms per call over {args.rounds} rounds; new/old of the minimum and of the median")
    for name, (a, b) in times.items():
        print(f"  {name:28s} old {statistics.median(a):6.2f}  new {statistics.median(b):6.2f}  "
              f"min {min(b) / min(a):5.3f}  median {statistics.median(b) / statistics.median(a):5.3f}")


if __name__ == "__main__":
    main()
