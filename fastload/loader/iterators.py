"""The loader's iterators: in-process, and with worker processes over shared memory.

Both follow torch's ``_BaseDataLoaderIter`` (which they extend) for sampling, seeding and
ordering, so the batches and their order are torch's. On top they keep what a resume needs
(the RNG state the epoch's order was drawn from; which batches of the sampler's order, or
which samples of which shards, the trainer has; samplers' and datasets' own states) and
count skipped samples.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from functools import partial
from multiprocessing import connection

import torch
from torch.utils.data import IterDataPipe, MapDataPipe
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind, _sharding_worker_init_fn
from torch.utils.data.graph_settings import apply_sharding

from ..errors import merge_counts
from ..progress import IndexSet, Progress
from . import shm
from .fetch import EMPTY, Fetcher
from .worker import WorkerConfig, worker_loop

_POLL_S = 0.1
_SKIP = object()


def rng_state(generator) -> list[int]:
    """The RNG state as a list of bytes (a checkpoint stays JSON-serializable)."""
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    return state.tolist()


def set_rng_state(generator, state: list[int]) -> None:
    state = torch.tensor(state, dtype=torch.uint8)
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
        self._kind = _kind(self._dataset, self._dataset_kind)
        self._done = Progress()
        self._batches_done = IndexSet()  # map-style: positions of the batches delivered
        self._drawn = self._last_pos = 0
        self._dataset_states = [None] * max(1, loader.num_workers)
        resume = loader._take_resume_state()
        if resume is not None and resume.get("finished"):
            # The epoch after a finished one. load_state_dict set the RNG where that epoch left
            # it, so a new iterator draws its base seed as the uninterrupted run did; persistent
            # workers instead keep the seed they were started with, and the sampler draws next.
            if loader.persistent_workers and loader.num_workers > 0:
                self._base_seed = resume["base_seed"]
                set_rng_state(loader.generator, resume["rng_now"])
            resume = None
        elif resume is not None:
            self._base_seed = resume["base_seed"]
            set_rng_state(loader.generator, resume["epoch_rng"])
            _load_own_states(self._samplers(loader), resume.get("sampler_states"))
            self._sampler_iter = iter(self._index_sampler)
            self._dataset_states = list(resume.get("dataset_states") or self._dataset_states)
            self._batches_done = IndexSet(resume.get("batches_done"))
            self._num_yielded = resume["yielded"]
            if resume["mode"] == "exact" and resume["progress"]:
                self._done = Progress.from_states(*resume["progress"])
        self._epoch_rng = rng_state(loader.generator)
        self._sampler_states = _own_states(self._samplers(loader))
        return resume

    def _samplers(self, loader) -> list:
        return [loader.sampler, loader.batch_sampler] if self._dataset_kind == _DatasetKind.Map else []

    def _next_index(self):
        """The next batch's indices from the sampler, passing over (drawn, not loaded) the
        batches a resumed epoch had already delivered: with ``in_order=False`` those need not
        be the first ones."""
        while True:
            index = next(self._sampler_iter)
            self._last_pos, self._drawn = self._drawn, self._drawn + 1
            if self._last_pos not in self._batches_done:
                return index

    def _batch_done(self, pos: int) -> None:
        if self._kind == "map":
            self._batches_done.add(pos)

    def _delivered(self, origins: list, skips, wid: int = 0, dataset_state=None) -> None:
        """Records what the trainer now has: the batch's origins, its skips in the stats, and
        the state of the dataset (in worker ``wid``) that produced it."""
        for origin in origins:
            self._done.add(origin)
        merge_counts(self._loader_stats, skips)
        if dataset_state is not None:
            self._dataset_states[wid] = dataset_state

    def settle_abandoned(self, handed: int) -> None:
        """Puts the loader's generator where torch's loader would have left it when the trainer
        left this epoch after ``handed`` batches.

        A prefetch stage draws batches ahead, so the sampler has drawn further than torch's
        (which dispatches ``prefetch_factor * num_workers`` past what was consumed). That
        matters: ``RandomSampler`` draws its next permutation from the generator only when run
        to its end, so the next epoch's order would depend on the stage's timing. Replaying
        torch's draws from the epoch's starting state keeps it torch's. Only for a generator
        the loader owns (the global RNG is the trainer's too) and samplers without own state.
        """
        if self._finished or self._kind != "map" or self._generator is None or any(self._sampler_states):
            return
        set_rng_state(self._generator, self._epoch_rng)
        sampler = iter(self._index_sampler)
        for _ in range(handed + self._dispatch_ahead()):
            if next(sampler, None) is None:
                break

    def _dispatch_ahead(self) -> int:
        return 0

    def state_dict(self) -> dict:
        state = {"kind": self._kind, "base_seed": self._base_seed, "epoch_rng": self._epoch_rng,
                 "rng_now": rng_state(self._generator), "finished": self._finished,
                 "yielded": self._num_yielded, "sampler_states": self._sampler_states,
                 "dataset_states": list(self._dataset_states), **self._progress()}
        if self._kind == "stream":
            state["progress"] = self._done.state()
        if self._kind == "map":
            state["batches_done"] = self._batches_done.ranges()
        return state

    def _progress(self) -> dict:
        return {}


def _own_states(objs: list) -> list:
    """Each sampler's own ``state_dict()`` as the epoch begins (None where it keeps none)."""
    return [obj.state_dict() if hasattr(obj, "state_dict") else None for obj in objs]


def _load_own_states(objs: list, states: list | None) -> None:
    for obj, state in zip(objs, states or []):
        if state is not None:
            obj.load_state_dict(state)


def _kind(dataset, dataset_kind) -> str:
    if dataset_kind == _DatasetKind.Map:
        return "map"
    return "stream" if hasattr(dataset, "stream") else "iterable"


class InProcessIter(_ResumableIter):
    """``num_workers=0``: fetch in the calling thread."""

    def __init__(self, loader):
        super().__init__(loader)
        if self._timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        if isinstance(self._dataset, (IterDataPipe, MapDataPipe)):  # torch shards DataPipes by rank
            apply_sharding(self._dataset, self._world_size, self._rank)
        self._fetcher = Fetcher(self._dataset, self._dataset_kind == _DatasetKind.Iterable,
                                self._auto_collation, self._collate_fn, self._drop_last, loader.on_error)
        resume = self._begin_epoch(loader)
        self._fetcher.start(_worker_resume(resume, 0), getattr(loader, "batch_size", None) or 1)

    def _next_data(self):
        while True:
            try:
                index = self._next_index()
                batch = self._fetcher.fetch(index)
            except StopIteration:
                self._finished = True
                raise
            self._batch_done(self._last_pos)
            self._delivered(self._fetcher.origins, self._fetcher.skips.take(), 0, self._fetcher.dataset_state())
            if batch is not EMPTY:
                return batch

    def _progress(self) -> dict:
        return {"batches": [self._num_yielded]}


def _worker_resume(resume: dict | None, wid: int) -> dict | None:
    """What worker ``wid`` needs to continue: the epoch's progress (stream datasets), its
    dataset's own saved state (datasets with ``load_state_dict``), or how many of its batches
    to replay and drop (other iterables)."""
    if resume is None:
        return None
    if resume["progress"] is not None:
        return {"mode": resume["mode"], "progress": resume["progress"]}
    batches = resume.get("batches") or []
    states = resume.get("dataset_states") or []
    return {"batches": batches[wid] if wid < len(batches) else 0,
            "dataset_state": states[wid] if wid < len(states) else None}


class WorkerIter(_ResumableIter):
    """``num_workers>0``: worker processes hand batches over in shared-memory slots."""

    def __init__(self, loader):
        super().__init__(loader)
        # As torch's iterator: the workers start with the DataPipe seed drawn first, and its
        # first _reset draws the next one (the generator then stands where torch's does).
        self._epoch_seed = self._shared_seed
        super()._reset(loader, first_iter=True)
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
        # Like torch: the loader's context ("fork", "spawn", "forkserver", or a context object),
        # else the global start method (multiprocessing / torch.multiprocessing.set_start_method).
        ctx = loader.multiprocessing_context or multiprocessing.get_context()
        if isinstance(ctx, str):
            ctx = multiprocessing.get_context(ctx)
        self._workers, self._inboxes, self._outboxes = [], [], []
        with _interrupts_deferred():
            self._spawn_workers(loader, ctx)
        self._in_main = [0] * self._num_workers  # pooled slots holding batches on our side
        self._permits = [0] * self._num_workers

    def _spawn_workers(self, loader, ctx) -> None:
        for wid in range(self._num_workers):
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=True)  # a socket: memfds travel on it
            cfg = WorkerConfig(
                dataset=self._dataset, is_iterable=self._dataset_kind == _DatasetKind.Iterable,
                auto_collation=self._auto_collation, collate_fn=self._collate_fn, drop_last=self._drop_last,
                batch_size=loader.batch_size or 1, base_seed=self._base_seed, init_fn=self._init_fn(loader),
                worker_id=wid, num_workers=self._num_workers, loader_id=self._id, slots=self._slots,
                on_error=loader.on_error, shared_seed=self._epoch_seed, parent_pid=os.getpid())
            proc = ctx.Process(target=worker_loop, args=(cfg, task_r, result_w), daemon=True)
            proc.start()
            task_r.close()
            result_w.close()
            self._workers.append(proc)
            self._inboxes.append(task_w)
            self._outboxes.append(result_r)

    def _init_fn(self, loader):
        """The user's ``worker_init_fn``; for DataPipes first sharded by rank and worker, as torch does."""
        if isinstance(self._dataset, (IterDataPipe, MapDataPipe)):
            return partial(_sharding_worker_init_fn, loader.worker_init_fn, self._world_size, self._rank)
        return loader.worker_init_fn

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def _send(self, wid: int, msg) -> None:
        """A message to a worker; a worker that died meanwhile is reported by pid and signal,
        not as the broken pipe its death left."""
        try:
            self._inboxes[wid].send(msg)
        except (BrokenPipeError, ConnectionResetError):
            self._raise_worker_failure(wid)

    def _reset(self, loader, first_iter: bool = False) -> None:
        if not first_iter:
            super()._reset(loader)
            self._epoch_seed = self._shared_seed
            self._resume = self._begin_epoch(loader)
            self._aborted = False
        self._send_idx = self._rcvd_idx = self._tasks_outstanding = 0
        self._task_info: dict = {}
        self._task_pos: dict[int, int] = {}  # task -> the batch's position in the sampler's order
        self._workers_status = [True] * self._num_workers
        self._workers_num_tasks = [0] * self._num_workers
        self._worker_queue_idx_cycle = itertools.cycle(range(self._num_workers))
        self._delivered_batches = [0] * self._num_workers
        resume = self._resume
        if resume is not None:
            self._delivered_batches = list(resume.get("batches") or self._delivered_batches)
            for _ in range(resume["next_worker"] % self._num_workers):  # the same worker gets each batch
                next(self._worker_queue_idx_cycle)
        epoch = getattr(self._dataset, "epoch", None)
        for wid in range(self._num_workers):
            self._send(wid, ("resume", epoch, _worker_resume(resume, wid), self._epoch_seed))
        self._await_resumed()
        for _ in range(self._prefetch_factor * self._num_workers):
            self._try_put_index()

    def _await_resumed(self) -> None:
        """Waits for every worker to acknowledge the new epoch, dropping stale batches."""
        waiting = self._num_workers
        while waiting:
            wid, (_, kind, *_rest) = self._receive(None)
            if kind == "resumed":
                waiting -= 1

    def _dispatch_ahead(self) -> int:
        return self._prefetch_factor * self._num_workers

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
        self._task_pos[self._send_idx] = self._last_pos
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
                idx = self._rcvd_idx
                wid, result = self._task_info.pop(idx)
                self._rcvd_idx += 1
            else:
                wid, (idx, kind, *payload) = self._receive(self._task_info[self._rcvd_idx][0])
                self._tasks_outstanding -= 1
                if kind == "end":
                    self._workers_status[wid] = False
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
            batch = self._process(result, wid, idx)
            if batch is not _SKIP:
                return batch

    def _process(self, result, wid: int, idx: int):
        self._workers_num_tasks[wid] -= 1
        self._batch_done(self._task_pos.pop(idx))
        self._try_put_index()
        kind = result[0]
        if kind == "error":
            result[1].reraise()
        *_, origins, skips, dataset_state = result
        self._delivered(origins, skips, wid, dataset_state)
        if kind == "empty":
            return _SKIP
        self._delivered_batches[wid] += 1
        return result[1]

    def _progress(self) -> dict:
        pending = self._task_info.get(self._rcvd_idx)
        next_worker = pending[0] if pending else self._rcvd_idx % self._num_workers
        return {"next_worker": next_worker, "batches": list(self._delivered_batches)}

    # -- receiving ----------------------------------------------------------------------------
    def _receive(self, waiting_for: int | None):
        """The next message from any worker: (worker id, message with any batch mapped)."""
        deadline = time.monotonic() + self._timeout if self._timeout > 0 else None
        sentinels = {w.sentinel: wid for wid, w in enumerate(self._workers)}
        conns = {c: wid for wid, c in enumerate(self._outboxes)}
        while True:
            self._flush_released()
            if waiting_for is not None:
                self._unblock(waiting_for)
            ready = connection.wait(list(conns) + list(sentinels), timeout=_POLL_S)
            for obj in ready:
                if obj in conns:
                    wid = conns[obj]
                    try:
                        return wid, self._attach(wid, obj.recv(), obj)
                    except EOFError:
                        self._raise_worker_failure(wid)
            for obj in ready:
                self._raise_worker_failure(sentinels[obj])
            if self._aborted:
                raise RuntimeError("fastload loader iteration was closed")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")

    def _attach(self, wid: int, msg, conn):
        """Maps a batch's segment (unlinking its name) and rebuilds the batch as views of it.

        A segment outside ``shm.SHM_DIR`` means ``/dev/shm`` was full and the worker fell back
        to a file: that works but is slower, so the first one is worth one warning (only the
        main process's warnings reach the user)."""
        if msg[1] != "batch":
            return msg
        idx, _, slot, path, size, skeleton, *progress = msg
        if shm.is_fallback(path) and not getattr(self, "_warned_fallback", False):
            import warnings

            self._warned_fallback = True
            stat = os.statvfs(shm.SHM_DIR)
            hint = -(-self._num_workers * self._slots * size // (1 << 30))
            warnings.warn(
                f"fastload: {shm.SHM_DIR} ({stat.f_blocks * stat.f_frsize >> 20} MiB) had no room for a "
                f"{size}-byte batch segment, so worker {wid} put it in {os.path.dirname(path)} "
                f"(file-backed, slower). In docker, give the container more shared memory, e.g. "
                f"`docker run --shm-size={hint}g` ({self._num_workers} workers x {self._slots} slots "
                f"of this size), or set {shm.FALLBACK_ENV} to a fast disk.", stacklevel=2)
        if slot < 0:
            self._permits[wid] -= 1
            buf = shm.attach_segment(path, size, conn)
            release = _noop
        else:
            cached = self._segments.get((wid, slot))
            if cached is None or cached[0] != path:
                cached = (path, shm.attach_segment(path, size, conn))
                self._segments[(wid, slot)] = cached
            buf = cached[1]
            self._in_main[wid] += 1
            release = partial(self._released.append, (wid, slot))
        return idx, "batch", shm.unpack(skeleton, buf, size, release), *progress

    def _flush_released(self) -> None:
        while self._released:
            wid, slot = self._released.popleft()
            self._in_main[wid] -= 1
            if not self._shutdown:
                self._send(wid, ("free", slot))

    def _unblock(self, waiting_for: int) -> None:
        """A worker with tasks to do whose every slot holds a batch the trainer still keeps
        may use one unpooled segment instead of waiting: a trainer that keeps batches never
        deadlocks the loader (in order, the worker it waits for is the one that matters), and
        with ``in_order=False`` a fast worker is never held back."""
        for wid in (range(self._num_workers) if not self._in_order else (waiting_for,)):
            if (self._workers_num_tasks[wid] and self._in_main[wid] >= self._slots
                    and self._permits[wid] == 0):
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


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds SIGINT/SIGTERM while workers start: one arriving inside ``fork`` can be lost
    (CPython's fork lock), and training would go on; held, it is raised right after. The
    workers unblock them first thing (a blocked mask is inherited, across exec too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
