"""ms per video, one process, one thread: fastload's video path vs transformers' on the same videos.

    python benchmarks/bench_video.py              # transformers' PIL-backend reference (no torchvision)
    .venv-video/bin/python benchmarks/bench_video.py   # transformers' real torchvision video processor
    .venv-video/bin/python benchmarks/bench_video.py --max-pixels 65536 --profile   # a training budget

Times are CPU seconds of this process (``time.process_time``: all its threads), which a
machine shared with other jobs disturbs far less than wall time; wall time is printed beside
them (and is what the 2-thread decode is judged by).

Per video and round, interleaved (each method once per round, rounds repeated, medians kept):

- ``fastload``: probe (packets, one decoded for the rotation), sample at fps 2.0, seek and decode
  only the sampled frames (non-reference frames in between skipped), kernel resize + normalize +
  patchify; ``exact`` too.
- ``decode sampled``: the same decoding with no conversion: the floor for any pipeline reading
  these frames with this decoder (the issue's target: fastload <= 1.5x of it).
- ``decode all``: every frame decoded in order (what a loader that reads the whole stream pays).
- ``transformers``: ``load_video(backend="pyav")`` (transformers' PyAV loader: decodes every frame
  up to the last sampled one) with ``Qwen2VLVideoProcessor.sample_frames`` at fps 2.0, then its
  video processor (torchvision where installed, else the PIL-backend reference of
  ``fastload.baseline_video``). transformers' default loader is torchcodec, whose PyPI wheels do
  not load next to a CPU torch (RESULTS.md).

Also: FFmpeg decoder threads 1 vs 2 for the same decode, parity of the outputs, and with
``--profile`` where fastload's time goes: the decode alone, then + RGB conversion, + resize, + the
kernel writing the patches (each stage timed whole, interleaved; differences are the stage's cost).
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(1)

import av
from common import MLLM_DEMO, PROCESSOR, machine, need_shared, table

from fastload.baseline_video import reference_video_processor
from fastload.video import decode_frames, probe, rgb24
from fastload.video_processor import Qwen2VLVideoProcessor, VideoConfig
from fastload.vision import resize_rgb


def hd_clip(path: str, seconds: int = 10, size=(1280, 720), fps: int = 30) -> str:
    """A 720p H.264 clip with x264's default GOP and B-frames, made from the demo's frames."""
    from PIL import Image

    if os.path.exists(path):
        return path
    with av.open(str(MLLM_DEMO / "mllm_demo_data" / "1.mp4")) as src:
        frames = [np.asarray(Image.fromarray(f.to_ndarray(format="rgb24")).resize(size, Image.BICUBIC))
                  for f in src.decode(video=0)]
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(seconds * fps):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_all(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        return sum(1 for _ in c.decode(stream))


def decode_sampled(data: bytes, indices, threads: int) -> list:
    """The sampled frames' decode alone (probe included, no RGB): the floor for this decoder."""
    return decode_frames(data, probe(data), indices, lambda frame: None, threads=threads)


def interleaved(methods: dict, rounds: int) -> dict:
    """{name: (median CPU ms, median wall ms)}, each method once per round, the first round a warm-up."""
    cpu, wall = {name: [] for name in methods}, {name: [] for name in methods}
    for _ in range(rounds + 1):
        for name, fn in methods.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {name: (statistics.median(cpu[name][1:]) * 1e3, statistics.median(wall[name][1:]) * 1e3)
            for name in methods}


def stages(data: bytes, plan, processor) -> dict:
    """fastload's path cut after each stage: decode (probe included), + RGB, + resize, + kernel."""
    th, tw = plan.target
    return {"decode": functools.partial(decode_sampled, data, plan.indices, 1),
            "+ rgb24": lambda: decode_frames(data, probe(data), plan.indices, rgb24),
            "+ resize": lambda: decode_frames(data, probe(data), plan.indices,
                                              lambda f: resize_rgb(rgb24(f), tw, th, processor.exact)),
            "+ kernel": functools.partial(processor, data)}


def transformers_path(reference, path: str):
    from transformers.video_utils import load_video

    vp = reference.video_processor
    sample = functools.partial(vp.sample_frames, fps=2.0)
    frames, meta = load_video(path, backend="pyav", sample_indices_fn=sample)
    return vp([frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-pixels", type=int, help="the video pixel budget per frame (default: the processor's, "
                        "Qwen2.5-VL's 12845056; LLaMA-Factory's default video_max_pixels is 65536)")
    parser.add_argument("--profile", action="store_true", help="also time fastload's stages")
    args = parser.parse_args()
    need_shared()
    paths = [str(MLLM_DEMO / "mllm_demo_data" / n) for n in ("1.mp4", "2.avi", "3.mp4", "4.mp4")]
    paths.append(hd_clip(os.path.join(tempfile.gettempdir(), "fastload_bench_720p.mp4")))
    budget = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    reference = reference_video_processor(PROCESSOR, video_max_pixels=args.max_pixels)
    config = VideoConfig.from_pretrained(PROCESSOR, **budget)
    fast, exact = Qwen2VLVideoProcessor(config), Qwen2VLVideoProcessor(config, exact=True)
    print(f"{machine()}; reference: {type(reference.video_processor).__name__}; torch threads 1; fps 2.0; "
          f"max_pixels {config.vision.max_pixels}; CPU ms (wall ms)\n")

    rows, parity, profile = [], [], []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        info = probe(data)
        plan = config.plan(info)
        ms = interleaved({
            "fastload": functools.partial(fast, data),
            "exact": functools.partial(exact, data),
            "decode sampled": functools.partial(decode_sampled, data, plan.indices, 1),
            "decode sampled, 2 threads": functools.partial(decode_sampled, data, plan.indices, 2),
            "decode all": functools.partial(decode_all, data),
            "transformers": functools.partial(transformers_path, reference, path),
        }, args.rounds)
        cpu = {name: c for name, (c, _) in ms.items()}
        n = len(plan.indices)
        rows.append([os.path.basename(path), f"{info.codec} {info.width}x{info.height}", info.frames, n,
                     "x".join(map(str, plan.grid)), *(f"{c:.0f} ({w:.0f})" for c, w in ms.values()),
                     f"{cpu['transformers'] / cpu['fastload']:.1f}x", f"{cpu['fastload'] / cpu['decode sampled']:.2f}",
                     f"{cpu['exact'] / cpu['decode sampled']:.2f}", f"{n / cpu['fastload'] * 1e3:.0f}"])
        if args.profile:
            cut = interleaved(stages(data, plan, fast), args.rounds)
            floor = cut["decode"][0]
            profile.append([os.path.basename(path), f"{probe_ms(data):.1f}",
                            *(f"{c:.0f} ({c / floor:.2f})" for c, _ in cut.values())])
        ours, ref = exact(data), transformers_path(reference, path)
        parity.append([os.path.basename(path), torch.equal(ours["video_grid_thw"], ref["video_grid_thw"]),
                       float((ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max()),
                       float((fast(data)["pixel_values_videos"] - ours["pixel_values_videos"]).abs().max())])
    print(table(["video", "codec size", "frames", "sampled", "grid", "fastload", "exact", "decode sampled",
                 "(2 threads)", "decode all", "transformers", "speed-up", "fastload / decode sampled",
                 "exact / decode sampled", "frames/s"], rows))
    if profile:
        print("\nfastload (fast) by stage, CPU ms (x the decode alone); probe alone beside:\n")
        print(table(["video", "probe", "decode", "+ rgb24", "+ resize", "+ kernel"], profile))
    print("\nparity (exact vs the reference; fast vs exact), max |diff| of pixel_values_videos:\n")
    print(table(["video", "grid equal", "exact vs reference", "fast vs exact"], parity))


def probe_ms(data: bytes, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        c = time.process_time()
        probe(data)
        times.append(time.process_time() - c)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
