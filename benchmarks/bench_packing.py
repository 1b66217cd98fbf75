"""Padding and throughput, side by side on the same shards and workers:
(1) plain batches of ``--batch`` samples (Qwen2VLCollator, padded to the longest);
(2) token-budget batches, length-grouped (``max_tokens``, Qwen2VLCollator);
(3) the same budget packed into one row per batch (Qwen2VLPackingCollator, 4-row M-RoPE positions).

The length mix is what VLM SFT data looks like: mllm_demo's conversations, 1-4 photos per sample
at mixed sizes (each of ../shared/images/photos at full, 1/2, 1/4 and 1/8 size), short and long
answers. Each setting streams the same shards (resampled: no epoch boundary, whose start and tail
would favour small batches in a short run) for ``--seconds`` per round, rounds interleaved with the
other settings, after the batches its workers had prefetched meanwhile are passed over; the best
round counts, and padding is over every batch measured.

    python benchmarks/bench_packing.py [--samples 400] [--workers 2] [--seconds 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import statistics
import tempfile
import time

import psutil
from common import MLLM_DEMO, PHOTOS, PROCESSOR, machine, need_shared, table

import fastload
from fastload.writer import ShardWriter

MAX_PIXELS = 1003520
MAX_TOKENS = 16384
SCALES = (1.0, 0.5, 0.25, 0.125)
LONG_ANSWER = ("The picture shows the scene in detail: the objects in the foreground, their colours and "
               "positions, the people and what they appear to be doing, and the setting behind them. ")


def photo_variants() -> list[bytes]:
    """Every photo at every scale, as JPEG: image sizes from ~0.01 to 12 MP."""
    from PIL import Image

    out = []
    for path in sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        image = Image.open(path).convert("RGB")
        for scale in SCALES:
            w, h = max(28, int(image.width * scale)), max(28, int(image.height * scale))
            buf = io.BytesIO()
            image.resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def conversations() -> list[tuple[str, str]]:
    """(question, short answer) pairs from mllm_demo, placeholders removed."""
    pairs = []
    for record in json.loads((MLLM_DEMO / "mllm_demo.json").read_text()):
        turns = record["messages"]
        pairs += [(q["content"].replace("<image>", ""), a["content"]) for q, a in zip(turns[::2], turns[1::2])]
    return pairs


def make_shards(root: pathlib.Path, samples: int) -> str:
    rng = random.Random(0)
    photos, pairs = photo_variants(), conversations()
    writer = ShardWriter(str(root / "mix"), maxcount=50)
    for i in range(samples):
        k = rng.choice([1, 1, 1, 2, 2, 3, 4])
        question, answer = rng.choice(pairs)
        if rng.random() < 0.5:
            answer += " " + LONG_ANSWER * rng.randrange(2, 40)
        meta = {"messages": [{"role": "user", "content": "<image>" * k + question},
                             {"role": "assistant", "content": answer}]}
        images = [rng.choice(photos) for _ in range(k)]
        members = {"jpg": images[0]} if k == 1 else {f"{j}.jpg": im for j, im in enumerate(images)}
        writer.write(f"{i:06d}", {"json": json.dumps(meta).encode(), **members})
    shards = writer.close({})
    return str(root / f"mix-{{000000..{len(shards) - 1:06d}}}.tar")


def loaders(urls: str, workers: int, batch: int) -> dict:
    transform = fastload.Qwen2VLTransform(PROCESSOR, max_pixels=MAX_PIXELS, cutoff_len=MAX_TOKENS).load()

    def make(collate, **kw):
        dataset = fastload.ShardDataset(urls, shuffle=100, resampled=True, transform=transform)
        return iter(fastload.DataLoader(dataset, num_workers=workers, collate_fn=collate, on_error="skip", **kw))

    budget = fastload.TokenBudget(MAX_TOKENS, lookahead=128)
    return {
        f"(1) plain, batch {batch}": make(fastload.Qwen2VLCollator(), batch_size=batch),
        f"(2) max_tokens {MAX_TOKENS}, length-grouped": make(fastload.Qwen2VLCollator(), batch_size=64,
                                                             max_tokens=budget),
        f"(3) max_tokens {MAX_TOKENS}, packed": make(fastload.Qwen2VLPackingCollator(), batch_size=64,
                                                     max_tokens=budget),
    }


def real_tokens(batch: dict) -> tuple[int, int]:
    """(samples, non-padding tokens) of a padded or packed batch."""
    if "seq_lens" in batch:
        return len(batch["seq_lens"]), int(batch["seq_lens"].sum())
    return batch["input_ids"].shape[0], int(batch["attention_mask"].sum())


def cpu_seconds(pids: list[int]) -> float:
    """CPU time so far of these processes: per sample, a measure this shared machine's load
    (other jobs on its 2 cores) moves much less than wall-clock rates."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def window(batches, seconds: float, skip: int) -> dict:
    """``seconds`` of batches after passing over ``skip`` (prefetched while another setting ran):
    samples, real and tensor tokens, each batch's padding share, the processes' CPU time."""
    for _ in range(skip):
        next(batches)
    pids = [os.getpid(), *getattr(batches, "worker_pids", [])]
    samples = useful = total = 0
    per_batch = []
    cpu, start = cpu_seconds(pids), time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        n, real = real_tokens(batch)
        samples, useful, total = samples + n, useful + real, total + batch["input_ids"].numel()
        per_batch.append(1 - real / batch["input_ids"].numel())
    return {"samples": samples, "useful": useful, "total": total, "padding": per_batch,
            "seconds": time.perf_counter() - start, "cpu": cpu_seconds(pids) - cpu}


def main() -> None:
    need_shared()
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {machine()}; {args.samples} samples, {args.workers} workers, max_pixels {MAX_PIXELS}, "
          f"best of {args.rounds} rounds of {args.seconds:.0f} s per setting\n")
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(pathlib.Path(tmp), args.samples)
        settings = loaders(urls, args.workers, args.batch)
        runs: dict[str, list[dict]] = {name: [] for name in settings}
        for _ in range(args.rounds):
            for name, batches in settings.items():
                runs[name].append(window(batches, args.seconds, skip=2 * max(1, args.workers)))
                print(f"  {name}: {runs[name][-1]['samples'] / runs[name][-1]['seconds']:.1f} samples/s", flush=True)
        rows, best = [], {}
        for name, measured in runs.items():
            m = best[name] = max(measured, key=lambda r: r["samples"] / r["seconds"])
            padding = [share for r in measured for share in r["padding"]]
            useful, total = sum(r["useful"] for r in measured), sum(r["total"] for r in measured)
            cpu = 1e3 * sum(r["cpu"] for r in measured) / sum(r["samples"] for r in measured)
            rows.append([name, len(padding), total // len(padding), 100 * statistics.mean(padding),
                         100 * (1 - useful / total), m["samples"] / m["seconds"], m["useful"] / m["seconds"], cpu])
        print(table(["setting", "batches", "tokens/batch", "padding % (mean/batch)", "padding % (all)",
                     "samples/s", "useful tokens/s", "CPU ms/sample"], rows))
        plain, grouped, packed = (best[name]["samples"] / best[name]["seconds"] for name in settings)
        print(f"\npacked / length-grouped samples/s: {packed / grouped:.3f}; packed / plain: {packed / plain:.3f}")


if __name__ == "__main__":
    main()
