"""Shared helpers for the benchmarks: where ../shared is (the one definition: the tests read
it from here too), timing, table printing."""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FASTLOAD_SHARED", ROOT.parent / "shared"))
PROCESSOR = SHARED / "qwen2_5_vl"
MLLM_DEMO = SHARED / "data" / "mllm_demo"
IMAGES = SHARED / "images"
PHOTOS = IMAGES / "photos"


def need_shared() -> None:
    if not PROCESSOR.is_dir():
        sys.exit(f"this benchmark needs {SHARED} (the Qwen2.5-VL processor and real photos)")


def median_ms(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> str:
    import platform

    import psutil

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


def shard_photo_records(root: pathlib.Path, samples: int, prefix: pathlib.Path, *flags: str) -> None:
    """``samples`` one-photo conversations (the real photos and mllm_demo's images, in turn),
    converted by fastload-shard to ``prefix-NNNNNN.tar``: the benchmarks' common dataset."""
    from fastload.cli.shard import main as shard_main

    images = sorted(str(p) for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images += sorted(str(p) for p in (MLLM_DEMO / "mllm_demo_data").glob("*.jpg"))
    rows = [{"messages": [{"role": "user", "content": "<image>Describe this image."},
                          {"role": "assistant", "content": f"Image number {i} shows something worth describing."}],
             "images": [images[i % len(images)]]} for i in range(samples)]
    (root / "records.json").write_text(json.dumps(rows))
    try:
        shard_main([str(root / "records.json"), str(prefix), *flags, "--quiet"])  # absolute image paths
    except SystemExit as exc:
        assert not exc.code
