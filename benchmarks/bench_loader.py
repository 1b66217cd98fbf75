"""End to end, side by side on the same shards, batch size and workers:
(a) fastload: ShardDataset + Qwen2VLTransform + Qwen2VLCollator in fastload.DataLoader (f32, bf16, uint8 wire);
(b) torch DataLoader + transformers' processor in the collate (the LLaMA-Factory path);
(c) webdataset.WebLoader + transformers' processor.
Plus per-worker RSS over 5 epochs and the eager path's time to first batch against dataset size.

    python benchmarks/bench_loader.py [--samples 2000] [--seconds 15]
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import psutil
import torch
import webdataset as wds

import fastload
from fastload import bench
from fastload.baseline import TransformersCollate

from common import PROCESSOR, machine, need_shared, shard_photo_records, table

MAX_PIXELS = 1003520
BATCH = 8


def make_shards(root: pathlib.Path, samples: int) -> str:
    shard_photo_records(root, samples, root / "train", "--maxcount", "100", "--workers", "2")
    n = len(list(root.glob("train-*.tar")))
    return str(root / f"train-{{000000..{n - 1:06d}}}.tar")


def loaders(urls: str):
    def ours(dtype):
        return lambda n: bench.fastload_loader(urls, PROCESSOR, n, BATCH, MAX_PIXELS, dtype)

    def webloader(n):
        pipeline = wds.WebDataset(urls, shardshuffle=False).batched(
            BATCH, collation_fn=TransformersCollate(PROCESSOR, MAX_PIXELS))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)

    return {
        "(a) fastload f32": ours(torch.float32),
        "(a) fastload bf16": ours(torch.bfloat16),
        "(a) fastload uint8 wire": ours(torch.uint8),
        "(b) torch + transformers": lambda n: bench.torch_loader(urls, PROCESSOR, n, BATCH, MAX_PIXELS),
        "(c) webdataset + transformers": webloader,
    }


def rss_over_epochs(urls_small: str, epochs: int = 5) -> list[list[float]]:
    """Per-worker RSS (MB) at the end of each epoch, persistent workers."""
    loader = bench.fastload_loader(urls_small, PROCESSOR, 2, BATCH, MAX_PIXELS)
    out = []
    for _ in range(epochs):
        for _batch in loader:
            pass
        out.append([psutil.Process(p).memory_info().rss / 2**20 for p in loader.worker_pids])
    return out


def eager_first_batch(urls: str, sizes: list[int]) -> list[list]:
    """LLaMA-Factory style: preprocess every sample up front, then train. Time to first batch."""
    collate = TransformersCollate(PROCESSOR, MAX_PIXELS)
    raw = list(fastload.ShardDataset(urls))
    rows = []
    for n in sizes:
        start = time.perf_counter()
        collate(raw[:1])  # processor load, as each run pays it
        for s in raw[:n]:
            collate([s])
        eager = time.perf_counter() - start
        loader = bench.fastload_loader(urls, PROCESSOR, 2, BATCH, MAX_PIXELS)
        start = time.perf_counter()
        next(iter(loader))
        rows.append([n, eager, time.perf_counter() - start])
        del loader
    return rows


def main() -> None:
    need_shared()
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args()
    print(f"machine: {machine()}; batch {BATCH}, max_pixels {MAX_PIXELS}, {args.seconds:.0f} s per setting\n")
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(pathlib.Path(tmp), args.samples)
        results = {}
        rows = []
        for name, make in loaders(urls).items():
            for n in (1, 2):
                m = bench.measure(lambda: make(n), n, args.seconds, label=name)
                results[(name, n)] = m
                rows.append([name, n, m.samples_per_s, m.images_per_s, m.cpu_seconds_per_sample,
                             m.time_to_first_batch_s, max(m.worker_rss_peak_mb or [0])])
                print(f"  {name} workers={n}: {m.samples_per_s:.1f} samples/s", flush=True)
        print(table(["loader", "workers", "samples/s", "images/s", "CPU s/sample", "first batch s",
                     "max worker RSS MB"], rows))
        base = results[("(b) torch + transformers", 2)].samples_per_s
        for name in ("(a) fastload f32", "(a) fastload bf16", "(a) fastload uint8 wire",
                     "(c) webdataset + transformers"):
            print(f"{name} / (b) at 2 workers: {results[(name, 2)].samples_per_s / base:.1f}x")
        f32 = [results[("(a) fastload f32", n)].samples_per_s for n in (1, 2)]
        print(f"fastload f32, 2 workers / 1 worker: {f32[1] / f32[0]:.2f}x\n")

        small = pathlib.Path(tmp) / "small"
        small.mkdir()
        urls_small = make_shards(small, 200)
        print("per-worker RSS (MB) at the end of each of 5 epochs (200 samples, persistent workers)")
        print(table(["epoch", "worker RSS MB"], [[i + 1, " / ".join(f"{r:.0f}" for r in e)]
                                                 for i, e in enumerate(rss_over_epochs(urls_small))]), "\n")
        print("time to first batch: eager preprocessing (transformers, every sample first) vs fastload")
        print(table(["samples", "eager s", "fastload s"], eager_first_batch(urls, [25, 50, 100, 200])))


if __name__ == "__main__":
    main()
