"""The worker process: fetch a batch, pack it into one of its shared-memory slots, report.

Messages in (from the main process): ``("task", idx, index)``, ``("free", slot)`` (a slot's
batch was released; slot ``-1`` permits one extra, unpooled segment), ``("resume", epoch,
skip)`` (start an epoch, optionally fast-forwarded), ``("stop",)``. Messages out:
``(idx, "batch", slot, path, size, skeleton, progress, skipped)``, ``(idx, "error", wrapper)``,
``(idx, "empty", skipped)``, ``(idx, "end")`` for an exhausted iterable, ``(None, "resumed")``.
A worker starts a task only when it has a free slot: that is the back-pressure.
"""
from __future__ import annotations

import ctypes
import os
import random
import signal
from collections import deque
from multiprocessing.reduction import send_handle
from dataclasses import dataclass

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import IterDataPipe
from torch.utils.data._utils import worker as torch_worker
from torch.utils.data.graph_settings import apply_random_seed

from . import shm
from .fetch import EMPTY, Fetcher

_PARENT_CHECK_S = 1.0
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass
class WorkerConfig:
    """Everything a worker needs; pickled once at start (fork shares it for free)."""

    dataset: object
    is_iterable: bool
    auto_collation: bool
    collate_fn: object
    drop_last: bool
    batch_size: int
    base_seed: int
    init_fn: object
    worker_id: int
    num_workers: int
    loader_id: str
    slots: int
    on_error: str
    shared_seed: int | None  # an IterDataPipe's epoch seed (torch's _shared_seed)
    parent_pid: int  # the trainer's; a forkserver worker's parent is the server, not the trainer


class Slots:
    """This worker's pooled segments, grown (as a new segment) when a batch outgrows one."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.free = set(range(cfg.slots))
        self.permits = 0  # extra one-off segments the main process allowed
        self.segments: dict[int, shm.Segment] = {}
        self.generation = 0
        self._new: list[shm.Segment] = []  # created for the message about to be sent

    def available(self) -> bool:
        return bool(self.free) or self.permits > 0

    def _create(self, slot: int, size: int, need: int) -> shm.Segment:
        """A new segment of ``size`` bytes, or of just ``need`` when memory has no room for the
        headroom (then a file elsewhere: the main process warns once)."""
        self.generation += 1
        path = shm.segment_path(self.cfg.loader_id, self.cfg.worker_id, slot, self.generation)
        segment = shm.new_segment(path, size, min_size=need)
        self._new.append(segment)
        return segment

    def write(self, batch) -> tuple[int, str, int, bytes]:
        """Packs ``batch`` into a free slot (or a permitted extra); returns where it went.
        A failed write (say, a kernel's) leaves the slot usable and no segment behind."""
        need = max(shm.packed_size(batch), 64)
        if not self.free:
            return self._write_extra(batch, need)
        slot = self.free.pop()
        try:
            segment = self.segments.get(slot)
            if segment is None or segment.size < need:
                if segment is not None:
                    segment.buf.close()
                grown = _round_up(max(need, int(segment.size * 1.5) if segment else 0), 1 << 20)
                segment = self.segments[slot] = self._create(slot, grown, need)
            return slot, segment.path, segment.size, shm.pack(batch, segment.buf)
        except BaseException:
            self.free.add(slot)
            if self.segments.get(slot) in self._new:
                del self.segments[slot]
            self._discard_new()
            raise

    def _write_extra(self, batch, need: int) -> tuple[int, str, int, bytes]:
        """Packs into a one-off segment the main process permitted."""
        segment = self._create(-1, need, need)
        try:
            skeleton = shm.pack(batch, segment.buf)
        except BaseException:
            self._discard_new()
            raise
        segment.buf.close()  # the memfd (or the named file) keeps the bytes until the main maps them
        self.permits -= 1
        return -1, segment.path, need, skeleton

    def hand_over(self, outbox) -> None:
        """Sends the memfds of the message just sent (the main process receives them next)."""
        for segment in self._new:
            if segment.fd is not None:
                send_handle(outbox, segment.fd, 0)
                os.close(segment.fd)
                segment.fd = None
        self._new.clear()

    def _discard_new(self) -> None:
        for segment in self._new:
            segment.discard()
        self._new.clear()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _seed(cfg: WorkerConfig) -> int:
    """Seeds exactly as torch's worker loop does, so random augmentations match torch."""
    seed = cfg.base_seed + cfg.worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(cfg.base_seed, cfg.worker_id))
    return seed


def _keep_freed_memory() -> None:
    """A float32 image's patches are ~24 MB; glibc would mmap such buffers afresh for every
    sample and pay a page fault per 4 KB on first touch. Raising the mmap and trim thresholds
    keeps freed buffers in the heap, so the next sample reuses warm pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def worker_loop(cfg: WorkerConfig, inbox, outbox) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # held while we started
    _keep_freed_memory()
    torch.set_num_threads(1)
    seed = _seed(cfg)
    reseed_datapipe(cfg.dataset, cfg.shared_seed)
    torch_worker._worker_info = torch_worker.WorkerInfo(
        id=cfg.worker_id, num_workers=cfg.num_workers, seed=seed, dataset=cfg.dataset)
    init_error = None
    try:
        if cfg.init_fn is not None:
            cfg.init_fn(cfg.worker_id)
    except Exception:
        init_error = ExceptionWrapper(where=f"in DataLoader worker process {cfg.worker_id}")
    fetcher = Fetcher(cfg.dataset, cfg.is_iterable, cfg.auto_collation, cfg.collate_fn, cfg.drop_last,
                      cfg.on_error, into_buffer=True)
    try:
        _serve(cfg, fetcher, init_error, inbox, outbox)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the main process went away; the finally clause cleans up
    finally:
        shm.unlink_matching(cfg.loader_id, cfg.worker_id)


class _TrainerWatch:
    """Tells when the trainer (``pid``) is gone, whatever the start method.

    ``fork`` and ``spawn`` workers are the trainer's children: when it dies they are
    re-parented, so ``getppid()`` changes (reliable even while the dead trainer is an unreaped
    zombie). A ``forkserver`` worker is the server's child: the server exits once the trainer
    has gone (its parent changes then too), and the trainer's pid is probed directly as well.
    The parent is read once, here; if it already is not the trainer, that probe decides."""

    def __init__(self, pid: int):
        self.pid = pid
        self.parent = os.getppid()

    def gone(self) -> bool:
        if os.getppid() != self.parent:
            return True
        if self.parent == self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else: a reused pid is not ours to judge
            pass
        return False


def _serve(cfg: WorkerConfig, fetcher: Fetcher, init_error, inbox, outbox) -> None:
    slots, pending = Slots(cfg), deque()
    trainer = _TrainerWatch(cfg.parent_pid)
    exhausted = False
    start_error = None
    while True:
        wait = 0 if (pending and slots.available()) else _PARENT_CHECK_S
        while inbox.poll(wait):
            msg = inbox.recv()
            kind = msg[0]
            if kind == "task":
                pending.append(msg[1:])
            elif kind == "free":
                if msg[1] < 0:
                    slots.permits += 1
                else:
                    slots.free.add(msg[1])
            elif kind == "resume":
                _, epoch, resume, shared_seed = msg
                pending.clear()
                exhausted = False
                start_error = _start_epoch(cfg, fetcher, epoch, resume, shared_seed)
                outbox.send((None, "resumed"))
            elif kind == "stop":
                return
            wait = 0
        if trainer.gone():
            return  # orphaned: the finally clause removes our segments
        if not (pending and slots.available()):
            continue
        idx, index = pending.popleft()
        if exhausted:
            continue  # like torch: tasks after the end are dropped; the main marks us inactive
        if init_error is not None or start_error is not None:
            outbox.send((idx, "error", init_error or start_error))
            if start_error is not None:  # like torch: raised once, then this worker's stream is over
                start_error, fetcher.ended = None, True
            continue
        try:
            outbox.send(_run_task(cfg, fetcher, slots, idx, index))
            slots.hand_over(outbox)
        except StopIteration:
            exhausted = True
            outbox.send((idx, "end"))
        except Exception:
            outbox.send((idx, "error", ExceptionWrapper(where=f"in DataLoader worker process {cfg.worker_id}")))


def _start_epoch(cfg: WorkerConfig, fetcher: Fetcher, epoch, resume, shared_seed) -> ExceptionWrapper | None:
    """Starts this worker's part of an epoch. An exception from the dataset's ``__iter__`` is
    kept and handed to the trainer with the next task, with this worker's traceback, as
    torch's worker loop does (the worker itself carries on)."""
    try:
        reseed_datapipe(cfg.dataset, shared_seed)
        if epoch is not None and hasattr(cfg.dataset, "set_epoch"):
            cfg.dataset.set_epoch(epoch)
        fetcher.start(resume, cfg.batch_size)
    except Exception:
        return ExceptionWrapper(where=f"in DataLoader worker process {cfg.worker_id}")
    return None


def reseed_datapipe(dataset, shared_seed: int | None) -> None:
    """An ``IterDataPipe``'s shufflers take the epoch's seed shared by all workers, as in torch."""
    if shared_seed is not None and isinstance(dataset, IterDataPipe):
        apply_random_seed(dataset, torch.Generator().manual_seed(shared_seed))


def _run_task(cfg: WorkerConfig, fetcher: Fetcher, slots: "Slots", idx: int, index) -> tuple:
    """Fetches one batch and writes it into a slot; the message that reports it.

    Writing computes the batch's write requests (e.g. the patch kernel) straight into shared
    memory; when that fails, the fetcher recomputes the batch sample by sample under the
    error policy.
    """
    batch = fetcher.fetch(index)
    if batch is not EMPTY:
        try:
            where = slots.write(batch)
        except (ValueError, MemoryError, RuntimeError) as exc:
            batch = fetcher.recollate(exc)
            where = None if batch is EMPTY else slots.write(batch)
    progress = (fetcher.origins, fetcher.skips.take(), fetcher.dataset_state())
    if batch is EMPTY:
        return idx, "empty", *progress
    del batch
    return (idx, "batch", *where, *progress)
