"""LLaMA-Factory 0.9.5's video samples, recorded for ``tests/test_video.py`` and compared here.

    .venv-video/bin/python benchmarks/parity_llamafactory_video.py [--lf-python .venv-lf/bin/python]

The LLaMA-Factory side runs in its own venv (see ``parity_llamafactory.py``): its converter,
``SupervisedDatasetProcessor`` (template ``qwen2_vl``) and SFT collator on one-video
conversations, per setting of ``video_fps`` / ``video_maxlen`` / ``video_max_pixels`` /
``video_min_pixels``. The videos are the mllm_demo's and a few small generated ones kept in
``tests/golden/llamafactory_videos`` (odd frame counts, sides under 28, a wide frame, MPEG-4 at
29.97 fps, a display rotation LLaMA-Factory does not apply). This process compares ``Qwen2VLTransform.from_llamafactory`` with the record and
writes ``tests/golden/llamafactory_video_golden.json``: input_ids, trained positions,
video_grid_thw, second_per_grid_ts and 64 pixel values per record.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import shutil
import subprocess
import sys
import tempfile

from parity_llamafactory import (
    GOLDEN,
    PROCESSOR,
    SHARED,
    _lf_modules,
    base_args,
    ensure_lf_venv,
    lf_collator,
    pixel_sample,
    rle,
    trained_mask,
)

VIDEOS = os.path.join(GOLDEN, "llamafactory_videos")
GOLDEN_FILE = os.path.join(GOLDEN, "llamafactory_video_golden.json")
DEMO_VIDEOS = ("1.mp4", "2.avi", "3.mp4")
GENERATED = {  # name -> (format, codec, width, height, frames, rate, options, display rotation)
    "odd.mp4": ("mp4", "libx264", 96, 64, 23, 24, {"preset": "ultrafast", "bf": "2", "g": "8"}, 0),
    "ntsc.avi": ("avi", "mpeg4", 160, 120, 95, fractions.Fraction(30000, 1001), {"g": "12"}, 0),
    "tiny.mp4": ("mp4", "libx264", 24, 20, 30, 10, {"preset": "ultrafast"}, 0),
    "wide.mp4": ("mp4", "libx264", 320, 48, 41, 15, {"preset": "ultrafast"}, 0),
    "rotated.mp4": ("mp4", "libx264", 112, 56, 16, 8, {"preset": "ultrafast"}, 90),  # a phone's portrait clip
}
SETTINGS = {
    "default": {},
    "fps1_maxlen4": {"video_fps": 1.0, "video_maxlen": 4},
    "pixels_16k_4k": {"video_max_pixels": 128 * 128, "video_min_pixels": 64 * 64},
    "fps5": {"video_fps": 5.0},
}


def make_videos() -> None:
    """The generated videos (PyAV, in this process), unless already there: their bytes are the record's."""
    import av
    import numpy as np

    os.makedirs(VIDEOS, exist_ok=True)
    for name, (fmt, codec, width, height, frames, rate, options, rotation) in GENERATED.items():
        path = os.path.join(VIDEOS, name)
        if os.path.exists(path):
            continue
        base = np.random.default_rng(0).integers(0, 255, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        with av.open(path, "w", format=fmt) as out:
            stream = out.add_stream(codec, rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if rotation:
                stream.set_display_rotation(rotation)
            for i in range(frames):
                img = np.kron(np.roll(base, i, axis=1), np.ones((4, 4, 1), np.uint8))[:height, :width].copy()
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def video_names() -> list[str]:
    return list(GENERATED) + [f"demo{name}" for name in DEMO_VIDEOS]


def rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": "<video>What happens in this video?"},
                          {"role": "assistant", "content": "Things move."}], "videos": [name]}
            for name in video_names()]


def build_case_dir(case_dir: str) -> None:
    for name in GENERATED:
        shutil.copy(os.path.join(VIDEOS, name), os.path.join(case_dir, name))
    for name in DEMO_VIDEOS:
        shutil.copy(os.path.join(SHARED, "data", "mllm_demo", "mllm_demo_data", name), os.path.join(case_dir, f"demo{name}"))
    with open(os.path.join(case_dir, "videos.json"), "w") as f:
        json.dump(rows(), f)
    info = {"videos": {"file_name": "videos.json", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "videos": "videos"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}}}
    with open(os.path.join(case_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f)


def record(input_ids: list[int], labels: list[int], grid, second_per_grid_ts, pixels) -> dict:
    """What is kept of a sample: tokens and trained positions as run lengths, the grid,
    second_per_grid_ts, and ``pixel_values_videos``' shape and 64 evenly spread values."""
    return {"input_ids": rle(input_ids), "trained": trained_mask(input_ids, labels), "video_grid_thw": grid.tolist(),
            "second_per_grid_ts": [float(s) for s in second_per_grid_ts], "shape": list(pixels.shape),
            "pixels": pixel_sample(pixels)}


# -- the LLaMA-Factory side (runs in .venv-lf) -----------------------------------------------------
def lf_side(case_dir: str, out_path: str) -> None:
    import llamafactory
    from llamafactory.data.loader import _get_dataset_processor, _get_merged_dataset

    results = {"llamafactory": llamafactory.__version__, "settings": {}}
    for setting, extra in SETTINGS.items():
        args = {**base_args(case_dir), **extra, "dataset": "videos"}
        modules, template, model_args, data_args, training_args = _lf_modules(args)
        aligned = _get_merged_dataset(["videos"], model_args, data_args, training_args, "sft")
        processor = _get_dataset_processor(data_args, "sft", template, modules["tokenizer"], modules["processor"])
        collator, records = lf_collator(modules, template), []
        for row in aligned:
            enc = processor.preprocess_dataset({k: [v] for k, v in row.items()})
            feature = {k: enc[k][0] for k in ("input_ids", "attention_mask", "labels", "images", "videos", "audios")}
            batch = collator([feature])
            records.append(record(feature["input_ids"], feature["labels"], batch["video_grid_thw"],
                                  batch["second_per_grid_ts"], batch["pixel_values_videos"]))
        results["settings"][setting] = records
    with open(out_path, "w") as f:
        json.dump(results, f)


# -- this side -------------------------------------------------------------------------------------
def fastload_record(setting: str, name: str, path: str) -> dict:
    import fastload
    from tests.test_video import video_sample

    transform = fastload.Qwen2VLTransform.from_llamafactory(
        {"model_name_or_path": PROCESSOR, "template": "qwen2_vl", **SETTINGS[setting]})
    with open(path, "rb") as f:
        out = transform(video_sample(rows()[video_names().index(name)]["messages"], [f.read()]))
    return record(out["input_ids"].tolist(), out["labels"].tolist(), out["video_grid_thw"], out["second_per_grid_ts"],
                  out["pixel_values_videos"])


def compare(golden: dict, case_dir: str) -> int:
    differing = 0
    for setting, records in golden["settings"].items():
        for name, lf in zip(video_names(), records):
            ours = fastload_record(setting, name, os.path.join(case_dir, name))
            same = {k: ours[k] == lf[k] for k in ("input_ids", "trained", "video_grid_thw")}
            spgt = max(abs(a - b) for a, b in zip(ours["second_per_grid_ts"], lf["second_per_grid_ts"]))
            pix = max(abs(a - b) for a, b in zip(ours["pixels"], lf["pixels"]))
            differing += not all(same.values()) or ours["shape"] != lf["shape"]
            print(f"{setting:14s} {name:10s} grid {lf['video_grid_thw']} {same} second_per_grid_ts |d| {spgt:.2g} "
                  f"pixels |d| {pix:.3f}")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lf-side", nargs=2, metavar=("CASE_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--lf-python", help="LLaMA-Factory's venv python (default: .venv-lf, made if missing)")
    args = parser.parse_args()
    if args.lf_side:
        lf_side(*args.lf_side)
        return
    make_videos()
    with tempfile.TemporaryDirectory() as case_dir:
        build_case_dir(case_dir)
        out = os.path.join(case_dir, "lf.json")
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
        subprocess.run([args.lf_python or ensure_lf_venv(), os.path.abspath(__file__), "--lf-side", case_dir, out],
                       check=True, env=env, cwd=case_dir)
        with open(out) as f:
            golden = json.load(f)
        differing = compare(golden, case_dir)
    with open(GOLDEN_FILE, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    print(f"\n{differing} record(s) differ; recorded {GOLDEN_FILE}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
