"""The last stage: a thread that runs the loader's iterator and transfers each batch ahead of
the trainer, ``depth`` batches deep: into pinned memory, onto the device, or (``device="cpu"``)
out of the workers' shared memory into ordinary memory.

Pinned copies come from torch's caching host allocator, which reuses freed pinned blocks;
device copies are non-blocking on a side stream: the trainer's stream waits on an event before
using a batch, and each of its tensors is recorded on the trainer's stream so the caching
allocator cannot hand its memory to the next batch while the trainer's kernels still read it.
Each source batch (a shared-memory view) is dropped right after its copy, which hands its slot
back to the worker.

Lifecycle: the loader keeps the :class:`Prefetcher` (for ``state_dict``); the trainer holds the
:class:`PrefetchIterator` over it. Dropping that iterator (leaving a loop early) stops the
thread at once and, unless the workers persist, shuts them down; with persistent workers the
loader also stops the old thread before the next epoch resets the shared worker iterator.
"""
from __future__ import annotations

import queue
import threading
import warnings

import numpy as np
import torch

from ..tree import map_tree

_POLL_S = 0.1
_JOIN_S = 5.0
_END = object()


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _is_array(x) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, np.ndarray) and x.dtype != object)


class Transfer:
    """Pins and/or moves every CPU tensor of a batch.

    ``device`` is where batches go (``None``: stay where they are). On the CPU, ``copy`` copies
    tensors and arrays out of the workers' shared memory (releasing the slot at once, as the
    pinned and device copies do); without it the batch passes through unchanged."""

    def __init__(self, pin: bool, device: torch.device | None, copy: bool = False):
        self.pin, self.device = pin, device
        self.copy = bool(copy and (device is None or device.type == "cpu") and not pin)  # pinning copies
        self.stream = torch.cuda.Stream(device=device) if device is not None and device.type == "cuda" else None
        self._leaf = _is_array if self.copy else _is_tensor

    def _move(self, t):
        if isinstance(t, np.ndarray):  # only reached when copying out of shared memory
            return t.copy()
        if t.device.type != "cpu":
            return t
        if self.pin:
            t = t.pin_memory()
        if self.copy:
            return t.clone()
        if self.device is not None and self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return t

    def __call__(self, batch):
        if self.stream is None:
            return map_tree(batch, self._leaf, self._move), None
        with torch.cuda.stream(self.stream):
            out = map_tree(batch, self._leaf, self._move)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _run(source, transfer: Transfer, q: queue.Queue, stop: threading.Event) -> None:
    """The thread body. It holds no reference to the Prefetcher, only to what it needs."""
    try:
        while not stop.is_set():
            try:
                batch = next(source)
            except StopIteration:
                _put(q, stop, _END)
                return
            state = source.state_dict()
            moved, event = transfer(batch)
            del batch  # releases the shared-memory slot (when the transfer copied it)
            if not _put(q, stop, (moved, event, state)):
                return
    except BaseException as exc:  # delivered to the consumer, raised there
        if not stop.is_set():  # after close it is only the wake-up from the closed source
            _put(q, stop, exc)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


class Prefetcher:
    """Runs ``source`` (a loader iterator) in a thread, transferring each batch ahead of time."""

    def __init__(self, source, transfer: Transfer, depth: int):
        self.source = source
        self._device = transfer.device
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = self._closed = False
        self._state = source.state_dict()
        self._thread = threading.Thread(target=_run, args=(source, transfer, self._queue, self._stop),
                                        name="fastload-prefetch", daemon=True)
        self._thread.start()

    def next(self):
        if self._done or self._stop.is_set():
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise StopIteration from None  # closed meanwhile
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("fastload prefetch thread exited unexpectedly") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        batch, event, self._state = item
        if event is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(event)
            # The batch was allocated on the side stream: without this, freeing it would let
            # the allocator reuse its memory for the next batch while `stream` still reads it.
            tensors: list = []
            map_tree(batch, lambda x: isinstance(x, torch.Tensor) and x.is_cuda, tensors.append)
            for t in tensors:
                t.record_stream(stream)
        return batch

    def state_dict(self) -> dict:
        """The source's state as of the last batch handed to the trainer (not the prefetched ones)."""
        return self._state

    def __len__(self) -> int:
        return len(self.source)

    def close(self) -> None:
        """Stops and joins the thread and drops the prefetched batches; shuts the workers down
        unless they persist across epochs (then they are left ready for the next reset)."""
        if self._closed:
            return
        self._stop.set()
        source = self.source
        persistent = bool(getattr(source, "_persistent_workers", False))
        if hasattr(source, "_aborted"):
            source._aborted = True  # wakes the thread if it waits for a worker
        if self._thread is threading.current_thread():
            return  # collected in the thread itself: it stops at its next check; a later close joins it
        _drain(self._queue)  # wakes the thread if it waits for room in the queue
        self._thread.join(timeout=_JOIN_S)
        _drain(self._queue)
        if self._thread.is_alive():
            warnings.warn(f"fastload: the prefetch thread did not stop within {_JOIN_S:.0f} s "
                          "(a sample is still loading); it stops after that sample", RuntimeWarning, stacklevel=2)
        else:
            if persistent:
                source._aborted = False  # the persistent workers serve the next epoch
            if hasattr(source, "settle_abandoned"):
                source.settle_abandoned(self._state["yielded"])
        if not persistent:
            getattr(source, "_shutdown_workers", lambda: None)()
        # a persistent source is shared with the next epoch: close again (join) until the thread is gone
        self._closed = not (persistent and self._thread.is_alive())

    def __del__(self):
        try:
            if hasattr(self, "_thread"):
                self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


class PrefetchIterator:
    """What ``iter(loader)`` returns when the prefetch stage is on. Dropping it (a trainer
    leaving its loop early) closes the stage; a closed iterator is exhausted."""

    def __init__(self, prefetcher: Prefetcher):
        self._prefetcher = prefetcher

    def __iter__(self):
        return self

    def __next__(self):
        return self._prefetcher.next()

    def __len__(self) -> int:
        return len(self._prefetcher)

    @property
    def source(self):
        return self._prefetcher.source

    def state_dict(self) -> dict:
        return self._prefetcher.state_dict()

    def close(self) -> None:
        self._prefetcher.close()

    def __del__(self):
        try:
            if hasattr(self, "_prefetcher"):
                self._prefetcher.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
