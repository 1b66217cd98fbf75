"""The last stage: a thread that copies batches into pinned memory or onto the device ahead
of the trainer, ``depth`` batches deep.

Pinned copies come from torch's caching host allocator, which reuses freed pinned blocks;
device copies are non-blocking on a side stream, and the consumer's stream waits on an
event before using them. Each source batch (a shared-memory view) is dropped right after
its copy, which hands its slot back to the worker.
"""
from __future__ import annotations

import queue
import threading

import torch

from .shm import map_tree

_POLL_S = 0.1
_END = object()


class Transfer:
    """Pins and/or moves every CPU tensor of a batch."""

    def __init__(self, pin: bool, device: torch.device | None):
        self.pin, self.device = pin, device
        self.stream = torch.cuda.Stream() if device is not None and device.type == "cuda" else None

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin and t.device.type == "cpu":
            t = t.pin_memory()
        if self.device is not None:
            t = t.to(self.device, non_blocking=True)
        return t

    def __call__(self, batch):
        if self.stream is None:
            return map_tree(batch, lambda x: isinstance(x, torch.Tensor), self._move), None
        with torch.cuda.stream(self.stream):
            out = map_tree(batch, lambda x: isinstance(x, torch.Tensor), self._move)
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
    """The thread body. It holds no reference to the PrefetchIterator, so dropping that
    iterator (a trainer leaving its loop early) stops the thread and frees the workers."""
    try:
        for batch in source:
            state = source.state_dict()
            moved, event = transfer(batch)
            del batch  # releases the shared-memory slot
            if not _put(q, stop, (moved, event, state)):
                return
        _put(q, stop, _END)
    except BaseException as exc:  # delivered to the consumer, raised there
        _put(q, stop, exc)


class PrefetchIterator:
    """Runs ``source`` (a loader iterator) in a thread, transferring each batch ahead of time."""

    def __init__(self, source, transfer: Transfer, depth: int):
        self.source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._state = source.state_dict()
        self._thread = threading.Thread(target=_run, args=(source, transfer, self._queue, self._stop),
                                        name="fastload-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("fastload prefetch thread exited unexpectedly") from None
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, event, self._state = item
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        return batch

    def state_dict(self) -> dict:
        """The source's state as of the last batch handed to the trainer (not the prefetched ones)."""
        return self._state

    def __len__(self) -> int:
        return len(self.source)

    def close(self) -> None:
        """Stops the thread; frees the workers unless they persist across epochs."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.source._aborted = True
        self._thread.join(timeout=5.0)
        if not getattr(self.source, "_persistent_workers", False):
            getattr(self.source, "_shutdown_workers", lambda: None)()

    def __del__(self):
        self.close()
