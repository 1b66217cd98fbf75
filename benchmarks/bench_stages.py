"""Where the time of one exact image goes: decode, each resize pass, and normalize + patch layout.

    python benchmarks/bench_stages.py

One photo, 1920x1080 -> its max_pixels=1003520 target (1316x728), single thread, median of 21 runs.
The passes are timed through the kernel's own entry points: a width-only resize is the horizontal
pass, a height-only resize of its output the vertical one, and patchifying an already-resized
image the normalize + patch-layout stage.
"""
from __future__ import annotations

import numpy as np
import simplejpeg
import torch

import fastload
from fastload import _kernels

from bench_image import photos_at
from common import PROCESSOR, machine, median_ms, need_shared


def main() -> None:
    need_shared()
    torch.set_num_threads(1)
    data = photos_at((1920, 1080))[0]
    rgb = simplejpeg.decode_jpeg(data, "RGB")
    proc = fastload.Qwen2VLImageProcessor.from_pretrained(PROCESSOR, max_pixels=1003520, exact=True)
    th, tw = proc.config.target_size(*rgb.shape[:2])
    wide = np.empty((rgb.shape[0], tw, 3), np.uint8)
    resized = np.empty((th, tw, 3), np.uint8)
    _kernels.resize(rgb, wide, rgb.shape[0], tw)
    _kernels.resize(rgb, resized, th, tw)
    out = np.empty((th * tw // 196, proc.config.patch_dim), np.float32)
    stages = {
        "decode": lambda: simplejpeg.decode_jpeg(data, "RGB"),
        "horizontal pass": lambda: _kernels.resize(rgb, wide, rgb.shape[0], tw),
        "vertical pass": lambda: _kernels.resize(wide, resized, th, tw),
        "normalize + patch layout": lambda: proc.process_into(resized, (th, tw), out),
        "whole kernel": lambda: proc.process_into(rgb, (th, tw), out),
    }
    print(f"machine: {machine()}; {rgb.shape[1]}x{rgb.shape[0]} -> {tw}x{th}, exact, single thread")
    for name, fn in stages.items():
        print(f"  {name:26s} {median_ms(fn, repeat=21):6.2f} ms")


if __name__ == "__main__":
    main()
