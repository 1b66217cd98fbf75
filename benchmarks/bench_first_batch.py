"""Time to first batch: from ``Qwen2VLTransform(...)`` construction to the first batch in the
trainer's hands (ShardDataset + Qwen2VLCollator in fastload.DataLoader, 2 workers, batch 4),
each in a fresh process, warm and cold, at 200 and 20,000 samples.

    PYTHONPATH=. python benchmarks/bench_first_batch.py [--rounds 3]

"cold": an empty fastload tokenizer cache (``FASTLOAD_CACHE``) and the shards and processor
folder evicted from the page cache (``posix_fadvise(DONTNEED)``); "warm": the same again with
the cache the cold run filled. The data sets: the e2e photo set (200 real photos), and small
synthetic samples (one 320x240 JPEG each) at 200 and 20,000 samples, so that size alone varies.
Imports (torch, fastload) are timed apart: a trainer pays them before anything else.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from common import PROCESSOR, machine, need_shared, photo_shards, table

CHILD = """
import json, sys, time
t = [time.perf_counter()]
import torch, fastload
t.append(time.perf_counter())
urls, processor = sys.argv[1], sys.argv[2]
transform = fastload.Qwen2VLTransform(processor, max_pixels=1003520)
t.append(time.perf_counter())
dataset = fastload.ShardDataset(urls, transform=transform)
t.append(time.perf_counter())
loader = fastload.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=fastload.Qwen2VLCollator())
t.append(time.perf_counter())
it = iter(loader)
t.append(time.perf_counter())
batch = next(it)
t.append(time.perf_counter())
phases = ["imports", "transform", "dataset", "loader", "iter", "next"]
print(json.dumps({**{p: b - a for p, a, b in zip(phases, t, t[1:])}, "first_batch": t[-1] - t[1]}))
"""


def synthetic_shards(root: pathlib.Path, samples: int) -> str:
    """``samples`` records of one small JPEG each (written once, referenced by every record)."""
    from fastload.cli.shard import main as shard_main

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = (np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3) + rng.integers(0, 32, (240, 320, 3)))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    (root / "small.jpg").write_bytes(buf.getvalue())
    rows = [{"messages": [{"role": "user", "content": "<image>What is this?"},
                          {"role": "assistant", "content": f"Synthetic sample {i}."}],
             "images": ["small.jpg"]} for i in range(samples)]
    (root / "records.json").write_text(json.dumps(rows))
    try:
        shard_main([str(root / "records.json"), str(root / "train"), "--maxcount", "1000", "--quiet"])
    except SystemExit as exc:
        assert not exc.code
    n = len(list(root.glob("train-*.tar")))
    return str(root / f"train-{{000000..{n - 1:06d}}}.tar")


def evict(paths: list[pathlib.Path]) -> None:
    """Drops the files' clean pages from the page cache (no root needed)."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def first_batch(urls: str, cache: str) -> dict:
    env = {**os.environ, "FASTLOAD_CACHE": cache}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, urls, str(PROCESSOR)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    need_shared()
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--large", type=int, default=20_000, help="samples of the large synthetic set")
    args = p.parse_args()
    print(f"machine: {machine()}; 2 workers, batch 4, max_pixels 1003520; median of {args.rounds} "
          "interleaved rounds, each case in a fresh process\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        sets = {"photos 200": photo_shards(root / "photos", 200),
                "synthetic 200": synthetic_shards(root / "small", 200),
                f"synthetic {args.large}": synthetic_shards(root / "large", args.large)}
        got = {(name, how): [] for name in sets for how in ("cold", "warm")}
        rng = random.Random(0)
        for r in range(args.rounds):
            for name in rng.sample(list(sets), len(sets)):
                cache = tempfile.mkdtemp(dir=tmp)
                evict([pathlib.Path(sets[name]).parent, PROCESSOR])
                got[(name, "cold")].append(first_batch(sets[name], cache))
                got[(name, "warm")].append(first_batch(sets[name], cache))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        phases = ["transform", "dataset", "loader", "iter", "next", "imports"]
        rows = [[name, how, statistics.median(m["first_batch"] for m in ms), min(m["first_batch"] for m in ms),
                 max(m["first_batch"] for m in ms), *(statistics.median(m[p] for m in ms) for p in phases)]
                for (name, how), ms in got.items()]
        print(table(["data set", "cache", "first batch s (median)", "min", "max",
                     *(f"{p} s" for p in phases)], rows))
        print("phases (medians): Qwen2VLTransform(...), ShardDataset(...), DataLoader(...), iter(loader) "
              "(workers started), next(it) (the first batch); imports are before the clock starts")


if __name__ == "__main__":
    main()
