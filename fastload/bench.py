"""Measuring a loader at several worker counts, and recommending one.

``sweep()`` runs the real pipeline (ShardDataset + Qwen2VLTransform + Qwen2VLCollator in
fastload.DataLoader) for a fixed time per setting and records throughput, CPU and memory;
``recommend()`` picks the smallest worker count within 5% of the best throughput whose
memory fits the machine with headroom.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil
import torch

TOLERANCE = 0.05  # "as good as the best" means within 5%
MEMORY_HEADROOM = 0.8  # use at most this share of the machine's memory


@dataclass
class Measurement:
    """One worker setting, measured after warm-up."""

    workers: int
    samples_per_s: float = 0.0
    images_per_s: float = 0.0
    tokens_per_s: float = 0.0
    time_to_first_batch_s: float = 0.0
    seconds: float = 0.0
    samples: int = 0
    cpu_percent_per_core: list = field(default_factory=list)
    cpu_seconds_per_sample: float = 0.0
    main_rss_peak_mb: float = 0.0
    worker_rss_peak_mb: list = field(default_factory=list)
    shm_peak_mb: float = 0.0
    label: str = "fastload"
    error: str | None = None

    @property
    def memory_mb(self) -> float:
        """Memory this setting needs: main + workers (RSS) + shared memory in flight."""
        return self.main_rss_peak_mb + sum(self.worker_rss_peak_mb) + self.shm_peak_mb


@dataclass
class Recommendation:
    workers: int
    reason: str


def batch_counts(batch) -> tuple[int, int, int]:
    """(samples, images, tokens) in a collated Qwen2.5-VL batch (or any batch with a length)."""
    if isinstance(batch, dict) and "input_ids" in batch:
        samples = int(batch["input_ids"].shape[0])
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        images = int(batch["image_grid_thw"].shape[0]) if "image_grid_thw" in batch else 0
        return samples, images, tokens
    return len(batch), 0, 0


class _Sampler(threading.Thread):
    """Polls RSS of the main process and the loader's workers, and shared memory in use."""

    def __init__(self, loader, period: float = 0.05):
        super().__init__(daemon=True)
        self.loader, self.period = loader, period
        self.stop = threading.Event()
        self.main_peak, self.worker_peak, self.shm_peak = 0, {}, 0
        self.worker_cpu: dict[int, float] = {}

    def run(self) -> None:
        main = psutil.Process()
        while not self.stop.wait(self.period):
            self.sample(main)

    def sample(self, main) -> None:
        self.main_peak = max(self.main_peak, main.memory_info().rss)
        for pid in worker_pids(self.loader):
            try:
                proc = psutil.Process(pid)
                self.worker_peak[pid] = max(self.worker_peak.get(pid, 0), proc.memory_info().rss)
                cpu = proc.cpu_times()
                self.worker_cpu[pid] = cpu.user + cpu.system
            except psutil.Error:
                pass
        self.shm_peak = max(self.shm_peak, shm_in_use(self.loader))


def worker_pids(loader) -> list[int]:
    """Worker process ids of a fastload or (persistent-worker) torch DataLoader, also when
    wrapped in a pipeline (webdataset's WebLoader)."""
    if hasattr(loader, "worker_pids"):
        return loader.worker_pids
    for candidate in (loader, *getattr(loader, "pipeline", [])):
        workers = getattr(getattr(candidate, "_iterator", None), "_workers", None)
        if workers:
            return [w.pid for w in workers]
    return []


def shm_in_use(loader) -> int:
    """Bytes of shared memory the loader's segments hold (mapped, or named in /dev/shm)."""
    front = getattr(loader, "_front", None)
    source = getattr(front, "source", front)
    mapped = sum(len(buf) for _, buf in getattr(source, "_segments", {}).values())
    loader_id = getattr(source, "_id", None)
    named = sum(os.path.getsize(p) for p in glob.glob(f"/dev/shm/{loader_id}-*")) if loader_id else 0
    return mapped + named


def measure(make_loader: Callable[[], Iterable], workers: int, seconds: float, warmup_batches: int = 2,
            label: str = "fastload") -> Measurement:
    """Iterates the loader (re-iterating epochs as needed) for ``seconds`` after warm-up."""
    m = Measurement(workers=workers, label=label)
    loader = make_loader()
    sampler = _Sampler(loader)
    me = psutil.Process()
    psutil.cpu_percent(percpu=True)
    start = time.perf_counter()
    it = iter(loader)
    sampler.start()
    try:
        seen = 0
        t0 = cpu0 = None
        samples = images = tokens = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            if seen == 0:
                m.time_to_first_batch_s = time.perf_counter() - start
            seen += 1
            if seen == warmup_batches:
                t0, cpu0 = time.perf_counter(), _cpu_seconds(me, sampler)
                psutil.cpu_percent(percpu=True)
                continue
            if t0 is not None:
                s, i, t = batch_counts(batch)
                samples, images, tokens = samples + s, images + i, tokens + t
                if time.perf_counter() - t0 >= seconds:
                    break
            del batch
        elapsed = time.perf_counter() - t0
        sampler.sample(me)
        m.cpu_percent_per_core = psutil.cpu_percent(percpu=True)
        m.cpu_seconds_per_sample = (_cpu_seconds(me, sampler) - cpu0) / max(samples, 1)
    finally:
        sampler.stop.set()
        sampler.join()
        del it
    m.seconds, m.samples = elapsed, samples
    m.samples_per_s, m.images_per_s, m.tokens_per_s = samples / elapsed, images / elapsed, tokens / elapsed
    mb = 1 / (1 << 20)
    m.main_rss_peak_mb = sampler.main_peak * mb
    m.worker_rss_peak_mb = [v * mb for v in sampler.worker_peak.values()]
    m.shm_peak_mb = sampler.shm_peak * mb
    return m


def _cpu_seconds(me, sampler: _Sampler) -> float:
    sampler.sample(me)
    cpu = me.cpu_times()
    return cpu.user + cpu.system + sum(sampler.worker_cpu.values())


def recommend(measurements: list[Measurement], memory_mb: float | None = None,
              headroom: float = MEMORY_HEADROOM, tolerance: float = TOLERANCE) -> Recommendation:
    """Smallest worker count within ``tolerance`` of the best throughput whose memory fits."""
    ok = [m for m in measurements if m.error is None and m.samples_per_s > 0]
    if not ok:
        return Recommendation(0, "no setting could be measured; num_workers=0 is the safe choice")
    memory_mb = memory_mb if memory_mb is not None else psutil.virtual_memory().total / (1 << 20)
    budget = headroom * memory_mb
    fits = [m for m in ok if m.memory_mb <= budget]
    if not fits:
        small = min(ok, key=lambda m: m.memory_mb)
        return Recommendation(small.workers, f"no setting fits {headroom:.0%} of {memory_mb:.0f} MB; "
                                             f"{small.workers} workers need the least ({small.memory_mb:.0f} MB)")
    best = max(fits, key=lambda m: m.samples_per_s)
    good = sorted((m for m in fits if m.samples_per_s >= (1 - tolerance) * best.samples_per_s),
                  key=lambda m: m.workers)
    choice = good[0]
    reason = (f"{choice.workers} workers give {choice.samples_per_s:.1f} samples/s, within {tolerance:.0%} "
              f"of the best ({best.samples_per_s:.1f} at {best.workers} workers), using "
              f"{choice.memory_mb:.0f} MB of the {budget:.0f} MB budget")
    skipped = [m.workers for m in ok if m not in fits]
    if skipped:
        reason += f"; {skipped} workers would not fit in memory"
    return Recommendation(choice.workers, reason)


def auto_worker_counts(measure_one: Callable[[int], Measurement], max_workers: int | None = None,
                       tolerance: float = TOLERANCE) -> list[Measurement]:
    """Doubling search (1, 2, 4, ...) until a doubling gains less than ``tolerance``, then one
    refinement halfway between the last count that helped and the first that did not."""
    max_workers = max_workers or max(1, (os.cpu_count() or 1) * 2)
    results: dict[int, Measurement] = {}
    n = 1
    while n <= max_workers:
        results[n] = measure_one(n)
        if results[n].error is not None:
            break  # more workers will not start either
        previous = results.get(n // 2)
        if previous is not None and results[n].samples_per_s < (1 + tolerance) * previous.samples_per_s:
            middle = (n // 2 + n) // 2
            if middle not in results:
                results[middle] = measure_one(middle)
            break
        n *= 2
    return [results[k] for k in sorted(results)]


@dataclass
class SweepResult:
    measurements: list[Measurement]
    recommendation: Recommendation
    baseline: list[Measurement] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        as_dict = lambda m: {**dataclasses.asdict(m), "memory_mb": m.memory_mb}  # noqa: E731
        return {"settings": self.settings, "measurements": [as_dict(m) for m in self.measurements],
                "baseline": [as_dict(m) for m in self.baseline],
                "recommendation": dataclasses.asdict(self.recommendation),
                "machine": {"cpus": os.cpu_count(), "memory_mb": psutil.virtual_memory().total / (1 << 20)}}


def fastload_loader(shards, processor_dir, workers: int, batch_size: int, max_pixels: int | None,
                    dtype: torch.dtype = torch.float32):
    """The real pipeline: ShardDataset -> Qwen2VLTransform -> Qwen2VLCollator in fastload.DataLoader."""
    from .collate import Qwen2VLCollator
    from .loader import DataLoader
    from .shards import ShardDataset
    from .text import Qwen2VLTransform

    transform = Qwen2VLTransform(processor_dir, max_pixels=max_pixels, dtype=dtype).load()
    dataset = ShardDataset(shards, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=Qwen2VLCollator(),
                      persistent_workers=workers > 0, on_error="skip")


def torch_loader(shards, processor_dir, workers: int, batch_size: int, max_pixels: int | None):
    """The baseline: torch's DataLoader with transformers' processor in the collate."""
    from .baseline import TransformersCollate
    from .shards import ShardDataset

    return torch.utils.data.DataLoader(ShardDataset(shards), batch_size=batch_size, num_workers=workers,
                                       collate_fn=TransformersCollate(processor_dir, max_pixels),
                                       persistent_workers=workers > 0)


def sweep(shards, processor_dir, workers: Iterable[int] | str = (0, 1, 2, 4), batch_size: int = 8,
          seconds: float = 20.0, max_pixels: int | None = None, compare_torch: bool = False,
          on_measurement: Callable[[Measurement], None] | None = None) -> SweepResult:
    """Measures the pipeline at each worker count (or ``"auto"``) and recommends one."""
    def measure_one(n: int, label: str = "fastload") -> Measurement:
        make = (lambda: fastload_loader(shards, processor_dir, n, batch_size, max_pixels)) if label == "fastload" \
            else (lambda: torch_loader(shards, processor_dir, n, batch_size, max_pixels))
        try:
            m = measure(make, n, seconds, label=label)
        except (OSError, RuntimeError) as exc:
            first_line = (str(exc).splitlines() or [""])[0]
            m = Measurement(workers=n, label=label, error=f"{type(exc).__name__}: {first_line}")
        if on_measurement:
            on_measurement(m)
        return m

    result = SweepResult([], Recommendation(0, ""), settings={
        "shards": shards, "processor": str(processor_dir), "batch_size": batch_size, "seconds": seconds,
        "max_pixels": max_pixels, "workers": workers if isinstance(workers, str) else list(workers)})
    try:
        if workers == "auto":
            result.measurements = auto_worker_counts(measure_one)
        else:
            for n in workers:
                result.measurements.append(measure_one(n))
        if compare_torch:
            for n in sorted({m.workers for m in result.measurements if m.error is None})[-1:]:
                result.baseline.append(measure_one(n, label="torch+transformers"))
    finally:
        result.recommendation = recommend(result.measurements)
    return result
