"""The main job (``bash run.sh demo``): shard a multimodal chat dataset and stream it through
fastload's loader into Qwen2.5-VL training batches, printing samples/s.

Uses ../shared/data/mllm_demo (replicated to --samples records) and the Qwen2.5-VL processor
in ../shared/qwen2_5_vl; without ../shared it generates a dataset of synthetic photos and, as
there is no tokenizer to load then, streams the image half of the pipeline only.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

import fastload
from fastload.cli.shard import main as shard_main

from common import MLLM_DEMO, PROCESSOR, ROOT


def replicate_mllm_demo(out: pathlib.Path, samples: int) -> pathlib.Path:
    """mllm_demo's records repeated to ``samples`` (images stay where they are: --image-root)."""
    src = MLLM_DEMO
    records = json.loads((src / "mllm_demo.json").read_text())
    rows = []
    for i in range(samples):
        r = dict(records[i % len(records)])
        rows.append(r)
    path = out / "mllm_demo_x.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def synthetic_dataset(out: pathlib.Path, samples: int) -> pathlib.Path:
    """Smooth random 'photos' (640x480 .. 1280x960 JPEGs) with one-turn captions."""
    rng = np.random.default_rng(0)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        w, h = (int(v) for v in rng.choice([(640, 480), (1024, 768), (1280, 960)]))
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(out / "img" / f"{i}.jpg", quality=90)
        rows.append({"messages": [{"role": "user", "content": "<image>Describe the picture."},
                                  {"role": "assistant", "content": f"Synthetic picture number {i}."}],
                     "images": [f"img/{i}.jpg"]})
    path = out / "synthetic.json"
    path.write_text(json.dumps(rows))
    return path


def shard(source: pathlib.Path, prefix: pathlib.Path, workers: int, image_root: str | None) -> str:
    args = [str(source), str(prefix), "--maxcount", "100", "--workers", str(workers), "--quiet"]
    try:
        shard_main(args + (["--image-root", image_root] if image_root else []))
    except SystemExit as exc:
        if exc.code:
            raise
    manifest = json.loads(pathlib.Path(f"{prefix}.manifest.json").read_text())
    return f"{prefix}-{{000000..{len(manifest['shards']) - 1:06d}}}.tar"


class ImagesOnly:
    """Without a tokenizer: decode and patchify every image of a sample."""

    def __init__(self, max_pixels: int):
        self.proc = fastload.Qwen2VLImageProcessor(fastload.VisionConfig(max_pixels=max_pixels))

    def __call__(self, sample):
        images = [v for k, v in sample.items() if k.endswith(("jpg", "png", "webp"))]
        return self.proc(images)


def collate_images(items):
    return {"pixel_values": torch.cat([i["pixel_values"] for i in items]),
            "image_grid_thw": torch.cat([i["image_grid_thw"] for i in items]),
            "input_ids": torch.zeros(len(items), 1, dtype=torch.long)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-pixels", type=int, default=1003520)
    p.add_argument("--out", default=str(ROOT / "demo_out"))
    args = p.parse_args(argv)

    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    have_shared = PROCESSOR.is_dir() and MLLM_DEMO.is_dir()
    if have_shared:
        source = replicate_mllm_demo(out, args.samples)
        print(f"data: ../shared/data/mllm_demo replicated to {args.samples} records")
    else:
        source = synthetic_dataset(out, args.samples)
        print(f"data: {args.samples} generated records (../shared is absent: image pipeline only)")
    t = time.perf_counter()
    image_root = str(MLLM_DEMO) if have_shared else None
    urls = shard(source, out / "shards" / "train", args.workers, image_root)
    print(f"fastload-shard: {args.samples} samples -> {urls} in {time.perf_counter() - t:.1f}s")

    if have_shared:
        transform = fastload.Qwen2VLTransform(PROCESSOR, max_pixels=args.max_pixels).load()
        collate = fastload.Qwen2VLCollator()
    else:
        transform, collate = ImagesOnly(args.max_pixels), collate_images
    loader = fastload.DataLoader(fastload.ShardDataset(urls, shuffle=100, transform=transform),
                                 batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    start = time.perf_counter()
    first = None
    samples = images = tokens = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        samples += batch["input_ids"].shape[0]
        images += batch["image_grid_thw"].shape[0] if "image_grid_thw" in batch else 0
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    elapsed = time.perf_counter() - start
    print(f"fastload.DataLoader: {samples} samples, {images} images, {tokens} tokens in {elapsed:.2f}s "
          f"with {args.workers} workers")
    print(f"  time to first batch {first:.2f}s; {samples / elapsed:.1f} samples/s, {images / elapsed:.1f} images/s")
    if samples != args.samples:
        sys.exit(f"demo: expected {args.samples} samples, got {samples}")


if __name__ == "__main__":
    main()
