"""Raw shard iteration, ShardDataset vs webdataset.WebDataset on the same shards (page cache),
fastload's own tar reader (``shards.tar_entries``) vs Python's ``tarfile`` on the same shards,
and fastload-shard conversion speed with 1 and 2 workers.

    python benchmarks/bench_shards.py [--samples 3000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import tarfile
import tempfile
import time

import webdataset as wds

from fastload.cli.shard import main as shard_main
from fastload.shards import ShardDataset, tar_entries

from common import MLLM_DEMO, PHOTOS, machine, need_shared, table


def dataset(root: pathlib.Path, samples: int) -> pathlib.Path:
    """Records cycling through the real photos and mllm_demo images, one image each."""
    images = sorted(str(p) for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images += sorted(str(p) for p in (MLLM_DEMO / "mllm_demo_data").glob("*.jpg"))
    rows = [{"messages": [{"role": "user", "content": "<image>What is shown?"},
                          {"role": "assistant", "content": f"Sample {i}."}],
             "images": [images[i % len(images)]]} for i in range(samples)]
    path = root / "records.json"
    path.write_text(json.dumps(rows))
    return path


def convert(source: pathlib.Path, prefix: pathlib.Path, workers: int, *extra: str) -> float:
    os.sync()  # each run starts with no earlier run's 1.7 GB still being written back
    start = time.perf_counter()
    try:
        shard_main([str(source), str(prefix), "--workers", str(workers), "--maxcount", "500", "--quiet",
                    "--image-root", "/", *extra])
    except SystemExit as exc:
        assert not exc.code
    return time.perf_counter() - start


def iterate(make) -> tuple[int, int, float]:
    start = time.perf_counter()
    n = nbytes = 0
    for sample in make():
        n += 1
        nbytes += sum(len(v) for k, v in sample.items() if isinstance(v, bytes))
    return n, nbytes, time.perf_counter() - start


def read_members(shards: list[str], reader) -> tuple[int, int]:
    """(members, bytes) of every shard through ``reader(file, url)`` -> (name, bytes or None)."""
    n = nbytes = 0
    for url in shards:
        with open(url, "rb") as f:
            for _name, data in reader(f, url):
                n += 1
                nbytes += len(data) if data is not None else 0
    return n, nbytes


def tarfile_stream(f, _url):
    """tarfile in stream mode (``r|``), reading each regular member's bytes: tar_entries' job."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def tarfile_index(f, _url):
    """tarfile in seekable mode: names and sizes only (what a counting pass needs)."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar.getmembers():
            if member.isfile():
                yield member.name, None


TAR_READERS = {  # name -> (reader, what it does)
    "tar_entries (data)": (lambda f, url: tar_entries(f, url), "data"),
    "tarfile r| (data)": (tarfile_stream, "data"),
    "tar_entries (names only, seeks)": (lambda f, url: tar_entries(f, url, with_data=False), "names"),
    "tarfile r: getmembers (names only)": (tarfile_index, "names"),
}


def compare_tar_readers(shards: list[str], rounds: int) -> str:
    """fastload's tar reader vs Python's tarfile on the same shards, in interleaved rounds
    (shuffled order each round), median seconds per reader."""
    times = {name: [] for name in TAR_READERS}
    counts = {}
    rng = random.Random(0)
    for name, (reader, _) in TAR_READERS.items():  # warm: page cache, imports
        counts[name] = read_members(shards, reader)
    for _ in range(rounds):
        for name in rng.sample(list(TAR_READERS), len(TAR_READERS)):
            start = time.perf_counter()
            read_members(shards, TAR_READERS[name][0])
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, (_, kind) in TAR_READERS.items():
        ref = med["tarfile r| (data)" if kind == "data" else "tarfile r: getmembers (names only)"]
        rows.append([name, counts[name][0], counts[name][0] / med[name], counts[name][1] / med[name] / 1e6,
                     ref / med[name]])
    return table(["reader", "members", "members/s", "MB/s", "speed vs tarfile"], rows)


def main() -> None:
    need_shared()
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the tar reader comparison")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        source = dataset(root, args.samples)
        rows = []
        # Plain copying is bound by reading and writing (fastload-shard keeps it in one process);
        # --validate decodes every image, which is where worker processes pay off.
        for extra, counts in (((), (1,)), (("--validate",), (1, 2))):
            for workers in counts:
                seconds = convert(source, root / f"w{workers}" / "train", workers, *extra)
                rows.append([" ".join(extra) or "(copy only)", workers, args.samples / seconds])
        print("fastload-shard conversion")
        print(table(["options", "workers", "samples/s"], rows), "\n")
        shards = sorted(str(p) for p in (root / "w2").glob("train-*.tar"))
        size = sum(os.path.getsize(s) for s in shards)
        readers = {
            "fastload.ShardDataset": lambda: ShardDataset(shards),
            "webdataset.WebDataset": lambda: wds.WebDataset(shards, shardshuffle=False),
        }
        for make in readers.values():  # warm the page cache
            iterate(make)
        rows, rates = [], {}
        for name, make in readers.items():
            best = min((iterate(make) for _ in range(3)), key=lambda r: r[2])
            rates[name] = best[0] / best[2]
            rows.append([name, best[0], rates[name], size / best[2] / 1e6])
        print(f"raw iteration over {len(shards)} shards ({size / 1e6:.0f} MB, page cache), best of 3")
        print(table(["reader", "samples", "samples/s", "MB/s"], rows))
        print(f"ShardDataset / WebDataset: {rates['fastload.ShardDataset'] / rates['webdataset.WebDataset']:.2f}x\n")
        print(f"tar members: fastload's reader vs Python's tarfile, median of {args.rounds} interleaved rounds")
        print(compare_tar_readers(shards, args.rounds))


if __name__ == "__main__":
    main()
