"""Shared helpers for the benchmarks: where ../shared is (the one definition: the tests read
it from here too), timing, table printing, the e2e photo set, transformers' baselines
(torchvision and PIL backends) and in-place stage timers."""
from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import statistics
import sys
import time

from fastload.baseline import TransformersCollate

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


def photo_shards(root: pathlib.Path, samples: int, maxcount: int = 50) -> str:
    """The end-to-end photo set (``samples`` one-photo records, :func:`shard_photo_records`) as a
    brace url; ``maxcount`` samples per shard, so that two workers get whole shards each."""
    root.mkdir(parents=True, exist_ok=True)
    shard_photo_records(root, samples, root / "train", "--maxcount", str(maxcount), "--workers", "2")
    n = len(list(root.glob("train-*.tar")))
    return str(root / f"train-{{000000..{n - 1:06d}}}.tar")


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def baseline_note() -> str:
    """Which transformers baselines this venv can run, said once at the top of a benchmark's output."""
    if has_torchvision():
        return ("baselines: transformers with torchvision (its default image processor, the one users run) "
                "and its PIL backend")
    return ("NOTE: torchvision is not installed here, so only transformers' PIL backend is measured; the "
            "baseline users run (torchvision backend) needs the .venv-tv venv (benchmarks/RESULTS.md)")


def transformers_collates(processor_dir, max_pixels: int | None) -> dict:
    """name -> transformers collate for the loaders: the torchvision backend where installed
    (primary), and the PIL backend always."""
    out = {"transformers (torchvision)": TransformersCollate(processor_dir, max_pixels)} if has_torchvision() else {}
    out["transformers (PIL)"] = PilBackendCollate(processor_dir, max_pixels)
    return out


def transformers_image_processors(processor_dir, max_pixels: int | None) -> dict:
    """name -> transformers' Qwen2-VL image processor: its default (torchvision) backend where
    installed, and the PIL backend always."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = {}
    if has_torchvision():
        from transformers import AutoImageProcessor

        out["transformers (torchvision)"] = AutoImageProcessor.from_pretrained(processor_dir, max_pixels=max_pixels)
    out["transformers (PIL)"] = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, max_pixels=max_pixels)
    return out


class PilBackendCollate(TransformersCollate):
    """``TransformersCollate`` with transformers' PIL image backend even where torchvision is
    installed (transformers then picks torchvision), so both baselines run in one venv."""

    def __call__(self, samples: list[dict]) -> dict:
        if self._proc is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            from fastload.baseline import reference_processor

            proc = reference_processor(self.processor_dir, self.max_pixels)
            kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
            proc.image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.processor_dir, **kwargs)
            self._proc = proc
        return super().__call__(samples)


class Stages:
    """Wall seconds, this thread's CPU seconds, calls and first/last times per stage, gathered by
    wrapping the real functions in place (benchmarks only: it changes the process it runs in). A
    wrapped call's time includes the wrapped calls it makes (the kernel runs inside the
    shared-memory write, say). Wall minus CPU is time blocked or waiting for a core: on a shared
    machine, CPU time is the cost that survives the neighbours."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def _add(self, stage: str, start: float, end: float, cpu: float) -> None:
        self.seconds[stage] += end - start
        self.cpu[stage] += time.thread_time() - cpu
        self.calls[stage] += 1
        self.first.setdefault(stage, start)
        self.last[stage] = end

    def wrap(self, owner, name: str, stage: str, by=None) -> None:
        """Times every call of ``owner.name`` (a module function or a class's method); ``by(*args)``,
        if given, splits the stage by what it returns (say, an image's format)."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(f"{stage} ({by(*args)})" if by else stage, start, time.perf_counter(), cpu)

        setattr(owner, name, timed)

    def wrap_iter(self, owner, name: str, stage: str) -> None:
        """Times each step of the generator ``owner.name`` returns (a reader's time per item)."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            it = fn(*args, **kwargs)
            try:
                while True:
                    start, cpu = time.perf_counter(), time.thread_time()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        self._add(stage, start, time.perf_counter(), cpu)
                    yield item
            finally:
                it.close()

        setattr(owner, name, timed)

    def state(self) -> dict:
        return {"seconds": dict(self.seconds), "cpu": dict(self.cpu), "calls": dict(self.calls), "first": dict(self.first),
                "last": dict(self.last)}
