"""The loader's iterators: in-process, and with worker processes over shared memory.

Both follow torch's ``_BaseDataLoaderIter`` (which they extend) for sampling, seeding and
ordering, so the batches and their order are torch's. On top they keep what an exact
resume needs (the RNG state the epoch's order was drawn from, batches delivered, and for
iterable datasets each worker's progress) and count skipped samples.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import deque
from functools import partial
from multiprocessing import connection

import torch
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind

from . import shm
from .fetch import EMPTY, Fetcher
from .worker import WorkerConfig, worker_loop

_POLL_S = 0.1
_SKIP = object()


def rng_state(generator):
    return generator.get_state() if generator is not None else torch.get_rng_state()


def set_rng_state(generator, state) -> None:
    if generator is not None:
        generator.set_state(state)
    else:
        torch.set_rng_state(state)


class _ResumableIter(_BaseDataLoaderIter):
    """Resume bookkeeping shared by both iterators."""

    def _begin_epoch(self, loader) -> dict | None:
        """Applies a pending ``load_state_dict`` and records the RNG state the epoch's order is
        drawn from (the sampler draws lazily, after torch drew the workers' base seed)."""
        self._loader_stats = loader.stats
        self._generator = loader.generator
        self._finished = False
        resume = loader._take_resume_state()  # only mid-epoch states get here
        if resume is not None:
            self._base_seed = resume["base_seed"]
            set_rng_state(loader.generator, resume["epoch_rng"])
            self._sampler_iter = iter(self._index_sampler)
        self._epoch_rng = rng_state(loader.generator)
        return resume

    def _skip_map_batches(self, n: int) -> None:
        """Fast-forwards a map-style epoch by drawing (not loading) its first ``n`` batches."""
        for _ in range(n):
            next(self._sampler_iter, None)
        self._num_yielded = n

    def state_dict(self) -> dict:
        return {"base_seed": self._base_seed, "epoch_rng": self._epoch_rng,
                "rng_now": rng_state(self._generator), "finished": self._finished,
                "yielded": self._num_yielded, **self._progress()}

    def _progress(self) -> dict:
        return {}


class InProcessIter(_ResumableIter):
    """``num_workers=0``: fetch in the calling thread."""

    def __init__(self, loader):
        super().__init__(loader)
        if self._timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        self._fetcher = Fetcher(self._dataset, self._dataset_kind == _DatasetKind.Iterable,
                                self._auto_collation, self._collate_fn, self._drop_last, loader.on_error)
        resume = self._begin_epoch(loader)
        self._consumed = None
        batches = resume["yielded"] if resume else 0
        if self._dataset_kind == _DatasetKind.Iterable:
            progress = (resume or {}).get("workers") or [{}]
            self._fetcher.start(progress[0].get("consumed") or 0, progress[0].get("batches", 0),
                                getattr(loader, "batch_size", None) or 1)
            self._num_yielded = batches
        else:
            self._skip_map_batches(batches)
        self._reported = 0

    def _next_data(self):
        while True:
            index = self._next_index()
            try:
                batch = self._fetcher.fetch(index)
            except StopIteration:
                self._finished = True
                raise
            self._report_skips()
            if batch is not EMPTY:
                self._consumed = self._fetcher.consumed
                return batch

    def _report_skips(self) -> None:
        total = self._fetcher.skipped_total
        self._loader_stats["skipped"] += total - self._reported
        self._reported = total

    def _progress(self) -> dict:
        return {"workers": [{"batches": self._num_yielded, "consumed": self._consumed}]}


class WorkerIter(_ResumableIter):
    """``num_workers>0``: worker processes hand batches over in shared-memory slots."""

    def __init__(self, loader):
        super().__init__(loader)
        self._prefetch_factor = loader.prefetch_factor
        self._in_order = loader.in_order
        self._persistent_workers = loader.persistent_workers
        self._resume = self._begin_epoch(loader)
        self._id = shm.new_loader_id()
        # Fewer, hotter segments measured faster than more (benchmarks/RESULTS.md); a trainer
        # that keeps more batches alive gets extra one-off segments instead of a deadlock.
        self._slots = loader.shm_slots or max(2, self._prefetch_factor)
        self._segments: dict = {}
        self._released: deque = deque()
        self._shutdown = False
        self._aborted = False  # set by the prefetch thread's owner to stop a blocked wait
        self._start_workers(loader)
        self._reset(loader, first_iter=True)

    # -- workers ---------------------------------------------------------------------------
    def _start_workers(self, loader) -> None:
        ctx = loader.multiprocessing_context or multiprocessing.get_context("fork")
        if isinstance(ctx, str):
            ctx = multiprocessing.get_context(ctx)
        self._workers, self._inboxes, self._outboxes = [], [], []
        for wid in range(self._num_workers):
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            cfg = WorkerConfig(
                dataset=self._dataset, is_iterable=self._dataset_kind == _DatasetKind.Iterable,
                auto_collation=self._auto_collation, collate_fn=self._collate_fn, drop_last=self._drop_last,
                batch_size=loader.batch_size or 1, base_seed=self._base_seed, init_fn=loader.worker_init_fn,
                worker_id=wid, num_workers=self._num_workers, loader_id=self._id, slots=self._slots,
                on_error=loader.on_error, parent_pid=os.getpid())
            proc = ctx.Process(target=worker_loop, args=(cfg, task_r, result_w), daemon=True)
            proc.start()
            task_r.close()
            result_w.close()
            self._workers.append(proc)
            self._inboxes.append(task_w)
            self._outboxes.append(result_r)
        self._in_main = [0] * self._num_workers  # pooled slots holding batches on our side
        self._permits = [0] * self._num_workers

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def _send(self, wid: int, msg) -> None:
        self._inboxes[wid].send(msg)

    def _reset(self, loader, first_iter: bool = False) -> None:
        if not first_iter:
            super()._reset(loader)
            self._resume = self._begin_epoch(loader)
            self._aborted = False
        self._send_idx = self._rcvd_idx = self._tasks_outstanding = 0
        self._task_info: dict = {}
        self._workers_status = [True] * self._num_workers
        self._workers_num_tasks = [0] * self._num_workers
        self._worker_queue_idx_cycle = itertools.cycle(range(self._num_workers))
        self._delivered = [0] * self._num_workers
        self._consumed = [None] * self._num_workers
        self._ended_at: list[int | None] = [None] * self._num_workers
        skips = self._apply_resume(self._resume)
        epoch = getattr(self._dataset, "epoch", None)
        for wid in range(self._num_workers):
            self._send(wid, ("resume", epoch, skips[wid]))
        self._await_resumed()
        for _ in range(self._prefetch_factor * self._num_workers):
            self._try_put_index()

    def _apply_resume(self, resume: dict | None) -> list[dict]:
        """Per-worker fast-forward instructions for this epoch."""
        none = [{} for _ in range(self._num_workers)]
        if resume is None:
            return none
        if self._dataset_kind == _DatasetKind.Map:
            self._skip_map_batches(resume["yielded"])
            return none
        self._num_yielded = resume["yielded"]
        workers = resume["workers"]
        self._workers_status = [w["active"] for w in workers]
        self._delivered = [w["batches"] for w in workers]
        self._consumed = [w["consumed"] for w in workers]
        for _ in range(resume["next_worker"]):
            next(self._worker_queue_idx_cycle)
        return [{"batches": w["batches"], "consumed": w["consumed"]} for w in workers]

    def _await_resumed(self) -> None:
        """Waits for every worker to acknowledge the new epoch, dropping stale batches."""
        waiting = self._num_workers
        while waiting:
            wid, (_, kind, *_rest) = self._receive(None)
            if kind == "resumed":
                waiting -= 1

    # -- dispatch (torch's algorithm) -----------------------------------------------------
    def _try_put_index(self) -> None:
        max_tasks = self._prefetch_factor * self._num_workers
        try:
            index = self._next_index()
        except StopIteration:
            return
        for _ in range(self._num_workers):
            wid = next(self._worker_queue_idx_cycle)
            if self._workers_status[wid]:
                if self._in_order or self._workers_num_tasks[wid] < max_tasks // sum(self._workers_status):
                    break
        else:
            return
        self._send(wid, ("task", self._send_idx, index))
        self._task_info[self._send_idx] = (wid,)
        self._workers_num_tasks[wid] += 1
        self._tasks_outstanding += 1
        self._send_idx += 1

    def _next_data(self):
        while True:
            while self._rcvd_idx < self._send_idx:
                info = self._task_info.get(self._rcvd_idx)
                if info and (len(info) == 2 or self._workers_status[info[0]]):
                    break
                self._task_info.pop(self._rcvd_idx, None)
                self._rcvd_idx += 1
            else:
                self._finished = True
                if not self._persistent_workers:
                    self._shutdown_workers()
                raise StopIteration
            if len(self._task_info[self._rcvd_idx]) == 2:
                wid, result = self._task_info.pop(self._rcvd_idx)
                self._rcvd_idx += 1
            else:
                wid, (idx, kind, *payload) = self._receive(self._task_info[self._rcvd_idx][0])
                self._tasks_outstanding -= 1
                if kind == "end":
                    self._workers_status[wid] = False
                    self._ended_at[wid] = idx
                    self._try_put_index()
                    continue
                result = (kind, *payload)
                if idx != self._rcvd_idx:
                    if self._in_order:
                        self._task_info[idx] += (result,)
                        continue
                    self._task_info.pop(idx)
                else:
                    self._task_info.pop(idx)
                    self._rcvd_idx += 1
            batch = self._process(result, wid)
            if batch is not _SKIP:
                return batch

    def _process(self, result, wid: int):
        self._workers_num_tasks[wid] -= 1
        self._try_put_index()
        kind = result[0]
        if kind == "error":
            result[1].reraise()
        self._loader_stats["skipped"] += result[-1]
        if kind == "empty":
            return _SKIP
        batch, consumed = result[1], result[2]
        self._delivered[wid] += 1
        self._consumed[wid] = consumed
        return batch

    def _progress(self) -> dict:
        if self._dataset_kind == _DatasetKind.Map:
            return {}
        pending = self._task_info.get(self._rcvd_idx)
        next_worker = pending[0] if pending else self._rcvd_idx % self._num_workers
        # A worker counts as finished only if its end came before the batches the trainer has
        # seen; an end already received for a prefetched task lies in the future.
        active = [end is None or end >= self._rcvd_idx for end in self._ended_at]
        return {"next_worker": next_worker,
                "workers": [{"batches": b, "consumed": c, "active": a}
                            for b, c, a in zip(self._delivered, self._consumed, active)]}

    # -- receiving ----------------------------------------------------------------------------
    def _receive(self, waiting_for: int | None):
        """The next message from any worker: (worker id, message with any batch mapped)."""
        deadline = time.monotonic() + self._timeout if self._timeout > 0 else None
        sentinels = {w.sentinel: wid for wid, w in enumerate(self._workers)}
        conns = {c: wid for wid, c in enumerate(self._outboxes)}
        while True:
            self._flush_released()
            ready = connection.wait(list(conns) + list(sentinels), timeout=_POLL_S)
            for obj in ready:
                if obj in conns:
                    wid = conns[obj]
                    try:
                        return wid, self._attach(wid, obj.recv())
                    except EOFError:
                        self._raise_worker_failure(wid)
            for obj in ready:
                self._raise_worker_failure(sentinels[obj])
            if self._aborted:
                raise RuntimeError("fastload loader iteration was closed")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")
            if waiting_for is not None:
                self._unblock(waiting_for)

    def _attach(self, wid: int, msg):
        """Maps a batch's segment (unlinking its name) and rebuilds the batch as views of it."""
        if msg[1] != "batch":
            return msg
        idx, _, slot, path, size, skeleton, consumed, skipped = msg
        if slot < 0:
            self._permits[wid] -= 1
            buf = shm.attach_segment(path, size)
            release = _noop
        else:
            cached = self._segments.get((wid, slot))
            if cached is None or cached[0] != path:
                cached = (path, shm.attach_segment(path, size))
                self._segments[(wid, slot)] = cached
            buf = cached[1]
            self._in_main[wid] += 1
            release = partial(self._released.append, (wid, slot))
        return idx, "batch", shm.unpack(skeleton, buf, size, release), consumed, skipped

    def _flush_released(self) -> None:
        while self._released:
            wid, slot = self._released.popleft()
            self._in_main[wid] -= 1
            if not self._shutdown:
                self._send(wid, ("free", slot))

    def _unblock(self, wid: int) -> None:
        """If every slot of the worker we wait for holds a batch the trainer still keeps,
        allow it one unpooled segment instead of waiting forever."""
        if self._in_main[wid] >= self._slots and self._permits[wid] == 0:
            self._permits[wid] += 1
            self._send(wid, ("free", -1))

    def _raise_worker_failure(self, wid: int):
        proc = self._workers[wid]
        proc.join(timeout=1.0)
        code = proc.exitcode
        self._shutdown_workers()
        if code is not None and code < 0:
            raise RuntimeError(f"DataLoader worker (pid {proc.pid}) is killed by signal: "
                               f"{signal.Signals(-code).name} ({signal.strsignal(-code)})")
        raise RuntimeError(f"DataLoader worker (pid {proc.pid}) exited unexpectedly with exit code {code}")

    # -- shutdown ------------------------------------------------------------------------------
    def _shutdown_workers(self) -> None:
        if getattr(self, "_shutdown", True):
            return
        self._shutdown = True
        for inbox in self._inboxes:
            try:
                inbox.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for proc in self._workers:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._workers:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1.0)
        for conn in self._inboxes + self._outboxes:
            conn.close()
        shm.unlink_matching(self._id)

    def __del__(self):
        self._shutdown_workers()


def _noop() -> None:
    pass
