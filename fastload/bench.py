"""Measuring a loader at several worker counts, and recommending one.

``sweep()`` runs the real pipeline (ShardDataset + Qwen2VLTransform + Qwen2VLCollator in
fastload.DataLoader) for a fixed time per setting, in several rounds, and records throughput,
the CPU time of the loader's own processes (the trainer and its workers: other processes on
the machine do not count) and memory; ``recommend()`` picks the smallest worker count as good
as the best (within 5%, or within the rounds' spread where that is wider) whose memory fits
the machine with headroom, so that a difference the noise explains never decides.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil
import torch

TOLERANCE = 0.05  # "as good as the best" means within 5%, or within the measured noise
ROUNDS = 3  # measured windows per setting: their spread is the run-to-run noise
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
    round_samples_per_s: list = field(default_factory=list)
    cpu_percent: float = 0.0  # the loader's processes: 100 = one core busy throughout
    cpu_seconds_per_sample: float = 0.0
    main_rss_peak_mb: float = 0.0
    worker_rss_peak_mb: list = field(default_factory=list)
    shm_peak_mb: float = 0.0
    label: str = "fastload"
    error: str | None = None

    @property
    def noise(self) -> float:
        """Half the spread of the rounds' throughputs (samples/s): how far one run may be off."""
        rounds = self.round_samples_per_s
        return (max(rounds) - min(rounds)) / 2 if len(rounds) > 1 else 0.0

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

    def run(self) -> None:
        main = psutil.Process()
        while not self.stop.wait(self.period):
            self.sample(main)

    def sample(self, main) -> None:
        self.main_peak = max(self.main_peak, main.memory_info().rss)
        for pid in worker_pids(self.loader):
            try:
                rss = psutil.Process(pid).memory_info().rss
                self.worker_peak[pid] = max(self.worker_peak.get(pid, 0), rss)
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


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and every process under it, from the kernel's own
    counts: live processes' from /proc, ended ones' from their waited-for totals (which the
    kernel adds to the parent's ``children_*``). Other processes on the machine do not count."""
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # ended since it was listed: counted once its parent waits for it
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class _Window:
    """One measured window: samples, images and tokens, wall and CPU seconds (loader's tree)."""

    def __init__(self, me: psutil.Process):
        self.me, self.start, self.cpu_start = me, time.perf_counter(), tree_cpu_seconds(me)
        self.samples = self.images = self.tokens = 0
        self.seconds = self.cpu = 0.0

    def add(self, batch) -> None:
        s, i, t = batch_counts(batch)
        self.samples, self.images, self.tokens = self.samples + s, self.images + i, self.tokens + t

    def finish(self) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = tree_cpu_seconds(self.me) - self.cpu_start


@contextlib.contextmanager
def _threads_as_in_a_worker(workers: int):
    """With 0 workers the pipeline runs in the main process, where torch would use every core;
    torch's worker loop sets one thread, so the 0-worker row runs with one as well."""
    if workers:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(make_loader: Callable[[], Iterable], workers: int, seconds: float, warmup_batches: int = 2,
            label: str = "fastload", rounds: int = ROUNDS) -> Measurement:
    """Iterates the loader (re-iterating epochs as needed) for ``seconds`` after warm-up, in
    ``rounds`` equal windows whose throughputs give the run-to-run noise."""
    m = Measurement(workers=workers, label=label)
    me = psutil.Process()
    with _threads_as_in_a_worker(workers):
        loader = make_loader()
        sampler = _Sampler(loader)
        start = time.perf_counter()
        it = iter(loader)
        sampler.start()
        try:
            m.time_to_first_batch_s, windows = _windows(it, loader, me, start, seconds, warmup_batches, rounds)
            sampler.sample(me)
        finally:
            sampler.stop.set()
            sampler.join()
            del it
    m.seconds = sum(w.seconds for w in windows)
    m.samples = sum(w.samples for w in windows)
    m.samples_per_s = m.samples / m.seconds
    m.images_per_s = sum(w.images for w in windows) / m.seconds
    m.tokens_per_s = sum(w.tokens for w in windows) / m.seconds
    m.round_samples_per_s = [w.samples / w.seconds for w in windows]
    cpu = sum(w.cpu for w in windows)
    m.cpu_percent = 100 * cpu / m.seconds
    m.cpu_seconds_per_sample = cpu / max(m.samples, 1)
    mb = 1 / (1 << 20)
    m.main_rss_peak_mb = sampler.main_peak * mb
    m.worker_rss_peak_mb = [v * mb for v in sampler.worker_peak.values()]
    m.shm_peak_mb = sampler.shm_peak * mb
    return m


def _windows(it, loader, me: psutil.Process, start: float, seconds: float, warmup_batches: int,
             rounds: int) -> tuple[float, list[_Window]]:
    """(time to the first batch, ``rounds`` back-to-back windows of ``seconds / rounds`` each
    after ``warmup_batches``)."""
    seen, first_batch_s, windows = 0, 0.0, []
    while True:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += 1
        if seen == 1:
            first_batch_s = time.perf_counter() - start
        if seen < warmup_batches:
            continue
        if not windows:  # the warm-up's last batch: measuring starts now
            windows.append(_Window(me))
            continue
        windows[-1].add(batch)
        del batch
        if time.perf_counter() - windows[-1].start >= seconds / rounds:
            windows[-1].finish()
            if len(windows) == rounds:
                return first_batch_s, windows
            windows.append(_Window(me))


def as_good(m: Measurement, best: Measurement, tolerance: float = TOLERANCE) -> bool:
    """``m`` cannot be told from ``best``: within ``tolerance`` of it, or within the two
    settings' noise together where that is wider (then two runs could rank them either way)."""
    margin = max(tolerance * best.samples_per_s, best.noise + m.noise)
    return m.samples_per_s >= best.samples_per_s - margin


def recommend(measurements: list[Measurement], memory_mb: float | None = None,
              headroom: float = MEMORY_HEADROOM, tolerance: float = TOLERANCE) -> Recommendation:
    """Smallest worker count as good as the best throughput (:func:`as_good`) whose memory fits."""
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
    choice = min((m for m in fits if as_good(m, best, tolerance)), key=lambda m: m.workers)
    noise = choice.noise + best.noise
    if choice is best:
        reason = f"{choice.workers} workers give the most samples/s ({best.samples_per_s:.1f} ± {best.noise:.1f})"
    else:
        reason = (f"{choice.workers} workers give {choice.samples_per_s:.1f} samples/s, within {tolerance:.0%} "
                  f"of the best ({best.samples_per_s:.1f} at {best.workers} workers)"
                  + (f" or of the run-to-run noise (±{noise:.1f})" if noise > tolerance * best.samples_per_s else ""))
    reason += f", using {choice.memory_mb:.0f} MB of the {budget:.0f} MB budget"
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
          on_measurement: Callable[[Measurement], None] | None = None, rounds: int = ROUNDS) -> SweepResult:
    """Measures the pipeline at each worker count (or ``"auto"``) and recommends one."""
    def measure_one(n: int, label: str = "fastload") -> Measurement:
        make = (lambda: fastload_loader(shards, processor_dir, n, batch_size, max_pixels)) if label == "fastload" \
            else (lambda: torch_loader(shards, processor_dir, n, batch_size, max_pixels))
        try:
            m = measure(make, n, seconds, label=label, rounds=rounds)
        except (OSError, RuntimeError) as exc:
            first_line = (str(exc).splitlines() or [""])[0]
            m = Measurement(workers=n, label=label, error=f"{type(exc).__name__}: {first_line}")
        if on_measurement:
            on_measurement(m)
        return m

    result = SweepResult([], Recommendation(0, ""), settings={
        "shards": shards, "processor": str(processor_dir), "batch_size": batch_size, "seconds": seconds,
        "rounds": rounds, "max_pixels": max_pixels, "workers": workers if isinstance(workers, str) else list(workers)})
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
