"""End to end, side by side on the same shards, batch size and workers:
(a) fastload: ShardDataset + Qwen2VLTransform + Qwen2VLCollator in fastload.DataLoader (f32, bf16, uint8 wire);
(b) torch DataLoader + transformers' processor in the collate (the LLaMA-Factory path): its default
    image processor (torchvision backend, what users run) where torchvision is installed, and its PIL backend;
(c) webdataset.WebLoader + transformers' default processor.
Every setting is measured once per round, rounds interleaved (shuffled order), medians reported.
Plus per-worker RSS over 5 epochs and the eager path's time to first batch against dataset size.

    PYTHONPATH=. .venv-tv/bin/python benchmarks/bench_loader.py [--samples 2000] [--seconds 15] [--rounds 3]

(``.venv-tv``: torch 2.14.1 + torchvision 0.29.1, see RESULTS.md; in ``.venv`` only the PIL column runs.)
"""
from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import tempfile
import time

import psutil
import torch
import webdataset as wds

import fastload
from fastload import bench
from fastload.baseline import TransformersCollate

from common import PROCESSOR, baseline_note, machine, need_shared, photo_shards, table, transformers_collates

MAX_PIXELS = 1003520
BATCH = 8


def loaders(urls: str):
    def ours(dtype):
        return lambda n: bench.fastload_loader(urls, PROCESSOR, n, BATCH, MAX_PIXELS, dtype)

    def torch_with(collate):
        return lambda n: torch.utils.data.DataLoader(fastload.ShardDataset(urls), batch_size=BATCH, num_workers=n,
                                                     collate_fn=collate, persistent_workers=n > 0)

    def webloader(n):
        pipeline = wds.WebDataset(urls, shardshuffle=False).batched(
            BATCH, collation_fn=TransformersCollate(PROCESSOR, MAX_PIXELS))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)

    baselines = {f"(b) torch + {name}": torch_with(collate)
                 for name, collate in transformers_collates(PROCESSOR, MAX_PIXELS).items()}
    return {
        "(a) fastload f32": ours(torch.float32),
        "(a) fastload bf16": ours(torch.bfloat16),
        "(a) fastload uint8 wire": ours(torch.uint8),
        **baselines,
        "(c) webdataset + transformers (default)": webloader,
    }


def interleaved(urls: str, seconds: float, rounds: int) -> dict:
    """(name, workers) -> Measurements, one per round; each round runs every setting for
    ``seconds / rounds`` in a shuffled order, so the machine's noise hits all alike."""
    settings = [(name, make, n) for name, make in loaders(urls).items() for n in (1, 2)]
    results = {(name, n): [] for name, _, n in settings}
    rng = random.Random(0)
    for r in range(rounds):
        for name, make, n in rng.sample(settings, len(settings)):
            results[(name, n)].append(bench.measure(lambda m=make, k=n: m(k), n, seconds / rounds, label=name))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return results


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
    p.add_argument("--seconds", type=float, default=15.0, help="per setting, over all rounds")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}; batch {BATCH}, max_pixels {MAX_PIXELS}, "
          f"{args.seconds:.0f} s per setting in {args.rounds} interleaved rounds\n{baseline_note()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        urls = photo_shards(pathlib.Path(tmp), args.samples, maxcount=100)
        results = interleaved(urls, args.seconds, args.rounds)
        rows, rate = [], {}
        for (name, n), ms in results.items():
            rate[(name, n)] = statistics.median(m.samples_per_s for m in ms)
            rows.append([name, n, rate[(name, n)], statistics.median(m.cpu_seconds_per_sample for m in ms),
                         statistics.median(m.time_to_first_batch_s for m in ms),
                         max(max(m.worker_rss_peak_mb or [0]) for m in ms)])
        print(table(["loader", "workers", "samples/s (median)", "CPU s/sample", "first batch s",
                     "max worker RSS MB"], rows))
        bases = [k for k in dict.fromkeys(name for name, _ in results) if k.startswith("(b)")]
        ratios = [[name, n, *(f"{rate[(name, n)] / rate[(b, n)]:.1f}x" for b in bases)]
                  for name, n in results if not name.startswith("(b)")]
        print("\nside by side at the same worker count (same run):")
        print(table(["loader", "workers", *(f"/ {b}" for b in bases)], ratios))
        f32 = [rate[("(a) fastload f32", n)] for n in (1, 2)]
        print(f"fastload f32, 2 workers / 1 worker: {f32[1] / f32[0]:.2f}x\n")

        urls_small = photo_shards(pathlib.Path(tmp) / "small", 200)
        print("per-worker RSS (MB) at the end of each of 5 epochs (200 samples, persistent workers)")
        print(table(["epoch", "worker RSS MB"], [[i + 1, " / ".join(f"{r:.0f}" for r in e)]
                                                 for i, e in enumerate(rss_over_epochs(urls_small))]), "\n")
        print("time to first batch: eager preprocessing (transformers, every sample first) vs fastload")
        print(table(["samples", "eager s", "fastload s"], eager_first_batch(urls, [25, 50, 100, 200])))


if __name__ == "__main__":
    main()
