"""``fastload.DataLoader``: torch's DataLoader, with shared-memory workers, a pinned/device
prefetch stage, exact resume and a per-sample error policy.

It *is* a ``torch.utils.data.DataLoader`` (same constructor, validation, samplers, ``len``,
``get_worker_info``); only the iterators are fastload's, so swapping the import changes
speed, not results.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.utils.data

from .iterators import InProcessIter, WorkerIter, set_rng_state
from .prefetch import PrefetchIterator, Transfer

_ON_ERROR = ("raise", "skip", "warn")


class DataLoader(torch.utils.data.DataLoader):
    """Drop-in for ``torch.utils.data.DataLoader``.

    Extra keyword options:
      device: prefetch batches onto this device (non-blocking copies on a side stream,
        ``prefetch_factor`` batches ahead); without CUDA, warns once and stays on the CPU.
      on_error: ``"raise"`` (default, with the worker's traceback), ``"skip"`` or ``"warn"``
        for a sample whose loading raises; skipped samples are counted in ``loader.stats``.
      shm_slots: shared-memory segments per worker (default ``max(2, prefetch_factor)``).
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False, pin_memory_device="", in_order=True,
                 device=None, on_error: str = "raise", shm_slots: int | None = None):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                         batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                         pin_memory=pin_memory, drop_last=drop_last, timeout=timeout,
                         worker_init_fn=worker_init_fn, multiprocessing_context=multiprocessing_context,
                         generator=generator, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
                         in_order=in_order)
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.shm_slots = shm_slots
        self.device = self._usable_device(device)
        self.stats = {"skipped": 0}
        self._resume_state: dict | None = None
        self._front = None  # the iterator the trainer is consuming

    @staticmethod
    def _usable_device(device) -> torch.device | None:
        if device is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn("fastload: device='cuda' but CUDA is not available; batches stay on the CPU",
                          stacklevel=3)
            return None
        return None if device.type == "cpu" else device

    def _get_iterator(self):
        if self.num_workers == 0:
            return InProcessIter(self)
        return WorkerIter(self)

    def __iter__(self):
        source = super().__iter__()
        pin = bool(self.pin_memory and torch.cuda.is_available())
        if pin or self.device is not None:
            self._front = PrefetchIterator(source, Transfer(pin, self.device), self.prefetch_factor or 2)
        else:
            self._front = source
        return self._front

    # -- exact resume (torchdata StatefulDataLoader semantics) ----------------------------------
    def state_dict(self) -> dict:
        """Where iteration stands: loading it into an identically built loader continues with
        exactly the batches the uninterrupted run would have produced next."""
        if self._front is None:
            return {"fastload": 1, "iterator": None, "dataset_epoch": getattr(self.dataset, "epoch", None)}
        return {"fastload": 1, "iterator": copy.deepcopy(self._front.state_dict()),
                "dataset_epoch": getattr(self.dataset, "epoch", None)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset_epoch") is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(state["dataset_epoch"])
        it = state.get("iterator")
        if it is None:
            return
        if it["finished"]:
            set_rng_state(self.generator, it["rng_now"])
            return
        if self._iterator is not None:  # persistent workers were seeded for another run
            self._iterator._shutdown_workers()
            self._iterator = None
        self._resume_state = it

    def _take_resume_state(self) -> dict | None:
        state, self._resume_state = self._resume_state, None
        return state

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current iteration's workers (empty with ``num_workers=0``)."""
        front = getattr(self._front, "source", self._front)
        return list(getattr(front, "worker_pids", []))
