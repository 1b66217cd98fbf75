"""Where the end-to-end time goes: fastload's loader against N x the single-thread rate of the
same transform + collate on the same data, and a per-stage account of one epoch.

    PYTHONPATH=. python benchmarks/stage_account.py [--samples 200] [--batch 4] [--rounds 2]

1. Rates, interleaved rounds (each contender once per round, in a shuffled order), every one an
   epoch of the e2e photo set (``--samples`` one-photo records, ``max_pixels=1003520``):
   - single thread (a forked child, one torch thread): ShardDataset + Qwen2VLTransform +
     Qwen2VLCollator in a plain loop, and the transform alone (patches into the kernel's reused
     output block: the work a worker cannot avoid, the reference "ref" for N x single);
   - fastload.DataLoader at 1 and 2 workers (float32, bfloat16, uint8 wire), persistent workers,
     one warm epoch first; "epoch" is samples / wall time of the epoch, "steady" leaves out the
     time to the epoch's first batch (the pipeline filling);
   - torch.utils.data.DataLoader with the same transform and collator (float32): the loader's
     transport alone against torch's.
2. The per-stage account: the same fastload epochs with timers around the real functions, in
   the trainer's process and in each worker (installed by ``worker_init_fn``; fastload's code is
   not changed). Stages nest, and each row says what it includes.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing.connection
import os
import pathlib
import pickle
import random
import statistics
import tempfile
import time
import types

import psutil
import torch

import fastload
from fastload import bench, shards, vision
from fastload.header import ParsedImage, sniff_format
from fastload.loader import iterators, shm, worker
from fastload.loader.fetch import Fetcher

from common import PROCESSOR, Stages, baseline_note, machine, need_shared, photo_shards, table

MAX_PIXELS = 1003520
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "uint8 wire": torch.uint8}


def make_transform(dtype: torch.dtype) -> fastload.Qwen2VLTransform:
    return fastload.Qwen2VLTransform(PROCESSOR, max_pixels=MAX_PIXELS, dtype=dtype).load()


def _single_thread_epoch(urls: str, dtype: torch.dtype, batch: int, collate: bool) -> tuple:
    """Read + transform (+ collate) in one thread (one torch thread, as a worker): (samples/s,
    samples/s, CPU ms per sample). Without ``collate`` each sample's patches come from the
    kernel's reused output block: the work a worker cannot avoid. With it, the collator
    concatenates them into a fresh batch tensor (for float32 at batch 4, ~95 MB of new pages
    per batch), as any process without fastload's transport does."""
    torch.set_num_threads(1)
    transform, collator = make_transform(dtype), fastload.Qwen2VLCollator()
    samples, pending = 0, []
    start, cpu = time.perf_counter(), time.process_time()
    for sample in fastload.ShardDataset(urls, transform=transform):
        pending.append(sample)
        if len(pending) == batch or not collate:
            samples += len(collator(pending)["input_ids"]) if collate else 1
            pending = []
    if pending:
        samples += len(collator(pending)["input_ids"])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return samples / wall, samples / wall, cpu * 1e3 / samples


def single_thread_epoch(urls: str, dtype: torch.dtype, batch: int, collate: bool) -> tuple:
    """:func:`_single_thread_epoch` in a forked child: a fresh heap each time, as a worker has."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(_single_thread_epoch, (urls, dtype, batch, collate))


def make_loader(urls: str, dtype: torch.dtype, workers: int, batch: int, torch_loader: bool = False,
                worker_init_fn=None, shm_slots: int | None = None):
    dataset = fastload.ShardDataset(urls, transform=make_transform(dtype))
    kwargs = dict(batch_size=batch, num_workers=workers, collate_fn=fastload.Qwen2VLCollator(),
                  persistent_workers=True, worker_init_fn=worker_init_fn)
    if torch_loader:
        return torch.utils.data.DataLoader(dataset, **kwargs)
    return fastload.DataLoader(dataset, shm_slots=shm_slots, **kwargs)


def timed_epoch(loader) -> tuple[int, float, float]:
    """(samples, seconds to the first batch, seconds in all) for one epoch."""
    samples, first = 0, None
    start = time.perf_counter()
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        samples += len(batch["input_ids"])
        del batch
    return samples, first, time.perf_counter() - start


def cpu_seconds(loader) -> float:
    """CPU seconds so far of this process and the loader's workers."""
    total = 0.0
    for pid in [os.getpid(), *bench.worker_pids(loader)]:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def loader_rates(loader) -> tuple[float, float, float]:
    """(epoch samples/s, steady samples/s, CPU ms per sample of trainer + workers) of one epoch
    after a warm one (workers started, pools faulted in)."""
    timed_epoch(loader)
    cpu = cpu_seconds(loader)
    samples, first, total = timed_epoch(loader)
    return samples / total, samples / (total - first), (cpu_seconds(loader) - cpu) * 1e3 / samples


def rate_contenders(urls: str, batch: int, dtypes: list[str]) -> dict:
    """name -> callable giving (epoch samples/s, steady samples/s, CPU ms per sample)."""
    out = {}
    for name in dtypes:
        out[f"single thread {name}: transform + collate"] = functools.partial(
            single_thread_epoch, urls, DTYPES[name], batch, True)
        out[f"single thread {name}: transform alone"] = functools.partial(
            single_thread_epoch, urls, DTYPES[name], batch, False)
        for n in (1, 2):
            out[f"fastload {name} N={n}"] = functools.partial(
                lambda d, n: loader_rates(make_loader(urls, d, n, batch)), DTYPES[name], n)
    for n in (1, 2):
        out[f"torch DataLoader f32 N={n}"] = functools.partial(
            lambda n: loader_rates(make_loader(urls, torch.float32, n, batch, torch_loader=True)), n)
    return out


def measure_rates(urls: str, batch: int, dtypes: list[str], rounds: int) -> dict:
    contenders = rate_contenders(urls, batch, dtypes)
    got = {name: [] for name in contenders}
    rng = random.Random(0)
    for r in range(rounds):
        for name in rng.sample(list(contenders), len(contenders)):
            got[name].append(contenders[name]())
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return {name: tuple(statistics.median(x[i] for x in v) for i in range(3)) for name, v in got.items()}


def rate_table(rates: dict, dtypes: list[str]) -> str:
    """Each loader against N x the single thread's transform alone (the work a worker cannot
    avoid: read, transform, patches into a reused buffer); transform + collate in one thread is
    what the issue names, and pays a fresh batch tensor that the loader's transport avoids."""
    rows = []
    for name in dtypes:
        rows.append([f"single thread {name}: transform + collate", "-",
                     *rates[f"single thread {name}: transform + collate"], "-", "-"])
        ref = rates[f"single thread {name}: transform alone"]
        rows.append([f"single thread {name}: transform alone (= ref)", "-", *ref, "-", "-"])
        for prefix in ("fastload", "torch DataLoader"):
            for n in (1, 2):
                key = f"{prefix} {name} N={n}"
                if key in rates:
                    epoch, steady, cpu = rates[key]
                    rows.append([key, n, epoch, steady, cpu, epoch / (n * ref[0]), steady / (n * ref[0])])
    return table(["contender", "workers", "epoch samples/s", "steady samples/s", "CPU ms/sample",
                  "epoch / (N x ref)", "steady / (N x ref)"], rows)


# -- the per-stage account --------------------------------------------------------------------
# (owner, attribute, stage — indented under the stage it runs inside —, how: "" per call, "iter" per
# item of the generator it returns, "by format" per call and image format)
WORKER_STAGES = [
    (shards, "tar_entries", "shard read (tar members)", "iter"),
    (fastload.Qwen2VLTransform, "_transform", "transform (all)", ""),
    (fastload.Qwen2VLTransform, "tokenized", "  tokenize incl. header (parsed once)", ""),
    (fastload.Qwen2VLTransform, "image_tokens", "    header for token count", ""),
    (vision, "decode", "  decode", "by format"),
    (vision, "resize_rgb", "  resize (uint8 wire)", ""),
    (fastload.Qwen2VLCollator, "collate_deferred", "collate", ""),
    (Fetcher, "fetch", "fetch (read + transform + collate)", ""),
    (worker.Slots, "write", "shared-memory write (all)", ""),
    (fastload.Qwen2VLImageProcessor, "process_into", "  kernel (patches into shm)", ""),
    (multiprocessing.connection.Connection, "send", "messages out (send)", ""),
    (worker, "_run_task", "a batch's task (all)", ""),
    (multiprocessing.connection.Connection, "poll", "waiting for a task or a free slot", ""),
]
TRAINER_STAGES = [
    (multiprocessing.connection, "wait", "waiting for workers (connection.wait)"),
    (multiprocessing.connection.Connection, "recv", "receive message (recv + unpickle)"),
    (shm, "attach_segment", "map segment (mmap)"),
    (shm, "unpack", "rebuild batch (unpickle skeleton + views)"),
    (iterators.WorkerIter, "_attach", "attach (map + rebuild)"),
    (iterators.WorkerIter, "_receive", "receive (wait + recv + attach)"),
    (iterators.WorkerIter, "_process", "bookkeeping + next task sent"),
    (iterators.WorkerIter, "_flush_released", "slot release sent"),
    (iterators.WorkerIter, "_next_data", "next batch (all of the above)"),
    (iterators._BaseDataLoaderIter, "__next__", "next(iterator): torch's wrapper + next batch"),
]


def image_format(source) -> str | None:
    """The format of what ``decode`` is given: a ParsedImage (header already read) or bytes."""
    return source.header.format if isinstance(source, ParsedImage) else sniff_format(source)


def _timed_pickle(stages: Stages, verb: str, stage: str) -> None:
    """shm's ``pickle`` module, with one of its functions timed (the skeleton's only)."""
    shim = types.SimpleNamespace(loads=pickle.loads, dumps=pickle.dumps, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    stages.wrap(shim, verb, stage)
    shm.pickle = shim


def _instrument_worker(out_dir: str, _worker_id: int) -> None:
    """worker_init_fn: times the worker's stages; each epoch starts from zero, and the last
    epoch's sums are written to ``out_dir`` when the worker exits."""
    from multiprocessing.util import Finalize

    stages = Stages()
    for owner, name, stage, kind in WORKER_STAGES:
        if kind == "iter":
            stages.wrap_iter(owner, name, stage)
        elif kind == "by format":
            stages.wrap(owner, name, stage, by=lambda source, *_args, **_kwargs: image_format(source))
        else:
            stages.wrap(owner, name, stage)
    _timed_pickle(stages, "dumps", "  skeleton pickle")
    start_epoch = worker._start_epoch

    def reset_then_start(*args):
        stages.reset()
        stages.first["epoch start"] = time.perf_counter()
        return start_epoch(*args)

    worker._start_epoch = reset_then_start
    path = pathlib.Path(out_dir) / f"worker-{os.getpid()}.pkl"
    Finalize(None, lambda: path.write_bytes(pickle.dumps(stages.state())), exitpriority=10)


def instrumented_epoch(urls: str, dtype: torch.dtype, workers: int, batch: int, shm_slots: int | None = None
                       ) -> dict:
    """One warm epoch, then one with every stage timed in the trainer and the workers."""
    with tempfile.TemporaryDirectory() as out_dir:
        loader = make_loader(urls, dtype, workers, batch, worker_init_fn=functools.partial(_instrument_worker, out_dir),
                             shm_slots=shm_slots)
        timed_epoch(loader)
        trainer = Stages()
        for owner, name, stage in TRAINER_STAGES:
            trainer.wrap(owner, name, stage)
        _timed_pickle(trainer, "loads", "  skeleton unpickle")
        samples, first, total = timed_epoch(loader)
        restore_trainer()  # before the shutdown, whose joins wait on connections too
        loader._iterator._shutdown_workers()  # the workers write their sums as they exit
        del loader
        worker_states = [pickle.loads(p.read_bytes()) for p in pathlib.Path(out_dir).glob("worker-*.pkl")]
    return {"samples": samples, "first": first, "total": total,
            "trainer": trainer.state(), "workers": worker_states, "workers_n": workers}


_ORIGINALS = {(owner, name): getattr(owner, name) for owner, name, _ in TRAINER_STAGES}
_PICKLE = shm.pickle


def restore_trainer() -> None:
    """Takes the trainer-side timers off again (later contenders run unwrapped)."""
    for (owner, name), fn in _ORIGINALS.items():
        setattr(owner, name, fn)
    shm.pickle = _PICKLE


def account_table(acc: dict) -> str:
    """Per stage, summed over the epoch (and over the workers): calls, wall and CPU ms per sample,
    and the share of the epoch's wall time (x workers for the workers' rows)."""
    n, samples, wall = acc["workers_n"], acc["samples"], acc["total"]
    rows = []

    def row(process, stage, states, processes):
        calls = sum(st["calls"].get(stage, 0) for st in states)
        if calls:
            seconds = sum(st["seconds"].get(stage, 0.0) for st in states)
            cpu = sum(st["cpu"].get(stage, 0.0) for st in states)
            rows.append([process, stage, calls, seconds * 1e3 / samples, cpu * 1e3 / samples,
                         seconds / (processes * wall) * 100])

    seen = {stage for w in acc["workers"] for stage in w["calls"]}
    for owner_stage in [stage for _, _, stage, _ in WORKER_STAGES] + ["  skeleton pickle"]:
        for stage in [owner_stage] + sorted(s for s in seen if s.startswith(owner_stage + " (")):
            row("worker", stage, acc["workers"], n)
    for stage in [stage for _, _, stage in TRAINER_STAGES] + ["  skeleton unpickle"]:
        row("trainer", stage, [acc["trainer"]], 1)
    spans = [w["last"].get("a batch's task (all)", 0) - w["first"].get("epoch start", 0) for w in acc["workers"]]
    return (table(["process", "stage (indented: inside the one above)", "calls", "wall ms/sample",
                   "CPU ms/sample", "% of (workers x) epoch wall"], rows)
            + "\nworkers: epoch start -> last batch written: " + ", ".join(f"{s:.2f} s" for s in spans)
            + f" of the trainer's {wall:.2f} s epoch")


def main() -> None:
    need_shared()
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ", ".join(DTYPES))
    p.add_argument("--account-only", action="store_true", help="skip the interleaved rates")
    p.add_argument("--workers", default="1,2", help="worker counts of the per-stage account")
    p.add_argument("--shm-slots", type=int, help="the per-stage account's loader's shm_slots (default: its own)")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(1)
    print(f"machine: {machine()}; {args.samples} photo samples, batch {args.batch}, max_pixels {MAX_PIXELS}; "
          f"torch {torch.__version__}; {baseline_note()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        urls = photo_shards(pathlib.Path(tmp), args.samples)
        if not args.account_only:
            rates = measure_rates(urls, args.batch, dtypes, args.rounds)
            print(f"\nrates: median of {args.rounds} interleaved rounds, one epoch each")
            print(rate_table(rates, dtypes), "\n", flush=True)
        for name in dtypes:
            for n in map(int, args.workers.split(",")):
                acc = instrumented_epoch(urls, DTYPES[name], n, args.batch, args.shm_slots)
                print(f"per-stage account, fastload {name}, {n} worker(s): {acc['samples']} samples in "
                      f"{acc['total']:.2f} s ({acc['samples'] / acc['total']:.1f} samples/s with timers), "
                      f"first batch after {acc['first'] * 1e3:.0f} ms")
                print(account_table(acc), "\n", flush=True)


if __name__ == "__main__":
    main()
