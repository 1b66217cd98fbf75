"""``fastload.DataLoader``: torch's DataLoader, with shared-memory workers, a pinned/device
prefetch stage, exact resume and a per-sample error policy.

It *is* a ``torch.utils.data.DataLoader`` (same constructor, validation, samplers, ``len``,
``get_worker_info``); only the iterators are fastload's, so swapping the import changes
speed, not results.
"""
from __future__ import annotations

import copy
import warnings
from typing import TypeVar

import torch
import torch.utils.data

from .. import budget
from ..errors import merge_counts
from .iterators import InProcessIter, WorkerIter, set_rng_state
from .resume import fingerprint, layout, plan
from .prefetch import Prefetcher, PrefetchIterator, Transfer

_ON_ERROR = ("raise", "skip", "warn")


_T_co = TypeVar("_T_co", covariant=True)


class DataLoader(torch.utils.data.DataLoader[_T_co]):
    """Drop-in for ``torch.utils.data.DataLoader``.

    Extra keyword options:
      device: prefetch batches onto this device in a background thread, ``prefetch_factor``
        batches ahead (on CUDA: non-blocking copies on a side stream, handed over to the
        trainer's stream); ``"cuda"`` without CUDA warns and leaves batches on the CPU with no
        prefetch stage. ``"cpu"`` runs the same stage on the CPU: with workers, the thread copies
        each batch out of shared memory into ordinary memory (so a batch the trainer keeps does
        not hold a worker's slot); with ``num_workers=0`` it loads batches ahead in the thread.
        ``pin_memory=True`` pins in that thread when CUDA is available (like torch, it warns and
        does not pin otherwise; it starts the stage only with CUDA or ``device``).
      on_error: ``"raise"`` (default, with the worker's traceback), ``"skip"`` or ``"warn"``
        for a sample whose loading raises; skipped samples are counted in ``loader.stats``.
      shm_slots: shared-memory segments per worker (default ``max(2, prefetch_factor)``; one more
        did not measurably cut the workers' waits: benchmarks/RESULTS.md, "Where the end-to-end
        time goes").
      max_tokens: token-budget batches (an int, or ``fastload.TokenBudget``): as many samples as
        fit in ``max_tokens`` once collated, at most ``batch_size``, grouped by length within a
        lookahead window (see :mod:`fastload.budget`).
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False, pin_memory_device="", in_order=True,
                 device=None, on_error: str = "raise", shm_slots: int | None = None,
                 max_tokens: int | budget.TokenBudget | None = None):
        batching = None
        if max_tokens is not None:
            batching = budget.token_batching(
                dataset, max_tokens, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                batch_sampler=batch_sampler, drop_last=drop_last, collate_fn=collate_fn, generator=generator,
                on_error=on_error)
            dataset, batch_size, collate_fn = batching.dataset, batching.batch_size, batching.collate_fn
            if batching.batch_sampler is not None:
                batch_sampler, shuffle, drop_last = batching.batch_sampler, None, False
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
        self.stats = {"skipped": 0, "by_cause": {}, "by_shard": {}}
        merge_counts(self.stats, batching.skips if batching else None)
        self._even_group = budget.even_steps_group() if isinstance(dataset, budget.TokenBatches) else None
        self._resume_state: dict | None = None
        self._loaded: dict | list | None = None  # what load_state_dict got, until iteration starts
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
        return device

    def _get_iterator(self):
        if self.num_workers == 0:
            return InProcessIter(self)
        return WorkerIter(self)

    def __iter__(self):
        front, self._front = self._front, None  # lets an abandoned iteration go before the next starts
        if isinstance(front, Prefetcher) and front.source is not None and front.source is self._iterator:
            front.close()  # its thread must stop before the persistent workers' iterator is reset
        del front
        source = super().__iter__()
        pin = bool(self.pin_memory and torch.cuda.is_available())
        if pin or self.device is not None:
            transfer = Transfer(pin, self.device, copy=self.num_workers > 0)
            self._front = Prefetcher(source, transfer, self.prefetch_factor or 2)
            return self._even(PrefetchIterator(self._front))
        self._front = source
        return self._even(source)

    def _even(self, iterator):
        """DDP over token batches of an iterable dataset: every rank stops at the step where the
        first runs out (:class:`~fastload.budget.EvenSteps`)."""
        return iterator if self._even_group is None else budget.EvenSteps(iterator, self._even_group)

    # -- resume (torchdata StatefulDataLoader semantics, elastic for ShardDataset) ------------
    def state_dict(self) -> dict:
        """Where iteration stands, as plain JSON-serializable data: loading it into an identically
        built loader continues with exactly the batches the uninterrupted run would have produced
        next. Before the first batch after ``load_state_dict``, it is the state just loaded."""
        if self._loaded is not None:
            return copy.deepcopy(self._loaded)
        it = self._front.state_dict() if self._front is not None else None
        return {"fastload": 2, "dataset": fingerprint(self.dataset),
                "dataset_epoch": getattr(self.dataset, "epoch", None), "layout": layout(self.num_workers),
                "iterator": copy.deepcopy(it)}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continues from ``state`` at the next ``iter()``. Resuming with another ``num_workers``
        or world size works for ``ShardDataset`` (what was left is dealt out again, each sample
        once); for another world size pass every rank's state as a list. Anything that cannot
        be continued exactly once raises :class:`~fastload.loader.resume.ResumeError`."""
        resume = plan(state, self)
        states = state if isinstance(state, (list, tuple)) else [state]
        epoch = states[0].get("dataset_epoch")
        if epoch is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if resume is not None and resume.get("finished"):
            set_rng_state(self.generator, resume["rng_now"])  # the next epoch draws from here
        if self._iterator is not None:  # persistent workers were seeded for another run
            self._iterator._shutdown_workers()
            self._iterator = None
        self._resume_state = resume
        self._loaded = copy.deepcopy(state)

    def _take_resume_state(self) -> dict | None:
        state, self._resume_state, self._loaded = self._resume_state, None, None
        return state

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current iteration's workers (empty with ``num_workers=0``)."""
        front = getattr(self._front, "source", self._front)
        return list(getattr(front, "worker_pids", []))
