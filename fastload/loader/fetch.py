"""Turning an index (or, for iterable datasets, the next items) into a collated batch.

torch's fetchers, under the error policy (:mod:`fastload.errors`): with ``"skip"``/``"warn"``
a sample whose loading raises is left out of its batch and counted by cause and shard,
instead of failing the run. Datasets with a ``stream()`` (``ShardDataset``) hand over
``(origin, item)`` pairs, where a skipped sample keeps its place as a ``Skip``: a batch is
``batch_size`` *positions* of the stream, so batch boundaries, DDP batch counts and resume
positions do not depend on how much of the data is bad, and the origins of every batch are
what the loader's resume state records.
"""
from __future__ import annotations

from itertools import islice

from torch.utils.data._utils.collate import default_collate as torch_default_collate

from ..deferred import collate_deferred, defers, materialize
from ..errors import Skip, SkipCounts, resolve, skip_for
from .collate import default_collate

#: Returned when every sample of a batch was skipped: the loader moves on to the next one.
EMPTY = object()


class Fetcher:
    """Fetches batches for one process (the main one, or a worker).

    ``into_buffer``: the batch will be written into a buffer the loader owns (a worker's
    shared-memory slot), so where the collate function has ``collate_deferred``, a stream
    dataset is asked for deferred samples and the batch may carry write requests
    (:mod:`fastload.deferred`) that the loader computes straight into the slot.
    """

    def __init__(self, dataset, is_iterable: bool, auto_collation: bool, collate_fn, drop_last: bool,
                 on_error: str = "raise", into_buffer: bool = False):
        self.dataset, self.is_iterable = dataset, is_iterable
        if collate_fn is torch_default_collate:
            collate_fn = default_collate
        self.defer = into_buffer and defers(collate_fn)
        self.auto_collation, self.drop_last = auto_collation, drop_last
        self.collate_fn = collate_deferred(collate_fn) if self.defer else collate_fn
        self.on_error = on_error
        self.policy = resolve(getattr(dataset, "on_error", None), on_error)
        self.skips = SkipCounts()
        self.origins: list = []  # origins of the last batch's stream positions
        self.ended = False
        self._data: list = []  # the last batch's samples, for recollate()
        self._stream = None
        self._it = None

    def start(self, resume: dict | None = None, batch_size: int = 1) -> None:
        """(Re)starts an iterable dataset's stream, fast-forwarded for an exact resume.

        A dataset with ``stream()`` leaves out what ``resume`` says was delivered; one with its
        own ``load_state_dict`` is given its saved state; others are replayed batch by batch
        (``resume["batches"]``) and those batches dropped.
        """
        self.ended = False
        own_state = (resume or {}).get("dataset_state")
        if own_state is not None:
            self.dataset.load_state_dict(own_state)
        if not self.is_iterable:
            return
        if hasattr(self.dataset, "stream"):
            self._stream = iter(self.dataset.stream(self.on_error, resume, defer=self.defer))
            return
        self._stream = None
        self._it = iter(self.dataset)
        if own_state is not None:
            return  # the dataset put itself where it was
        try:
            for _ in range((resume or {}).get("batches", 0)):
                self.fetch([None] * batch_size if self.auto_collation else None)
        except StopIteration:
            pass

    def dataset_state(self):
        """The dataset's own ``state_dict()`` (torchdata's protocol) after the last batch, for
        datasets that keep one (stream datasets are resumed by their origins instead)."""
        if hasattr(self.dataset, "state_dict") and not hasattr(self.dataset, "stream"):
            return self.dataset.state_dict()
        return None

    def _item(self, index):
        if self.policy == "raise":
            return self.dataset[index]
        try:
            return self.dataset[index]
        except Exception as exc:
            self.skips.add(skip_for(exc, None, f"sample {index!r}", self.policy))
            return EMPTY

    def _collate(self, data: list):
        self._data = data
        if not data:
            return EMPTY
        return self.collate_fn(data) if self.auto_collation else self.collate_fn(data[0])

    def _map_batch(self, index):
        if not self.auto_collation:
            return self._collate([x for x in (self._item(index),) if x is not EMPTY])
        if self.policy == "raise" and getattr(self.dataset, "__getitems__", None):
            return self._collate(self.dataset.__getitems__(index))
        return self._collate([x for x in (self._item(i) for i in index) if x is not EMPTY])

    def _stream_batch(self, index):
        n = len(index) if self.auto_collation else 1
        events = list(islice(self._stream, n))
        if not events or (self.drop_last and len(events) < n):
            self.ended = True
            raise StopIteration
        self.origins = [origin for origin, _ in events]
        data = []
        for _, item in events:
            if isinstance(item, Skip):
                self.skips.add(item)
            else:
                data.append(item)
        return self._collate(data)

    def _next_plain(self):
        while True:
            try:
                return next(self._it)
            except StopIteration:
                raise
            except Exception as exc:
                self.skips.add(skip_for(exc, None, "an item of the iterable dataset", self.policy))

    def _plain_batch(self, index):
        n = len(index) if self.auto_collation else 1
        data = []
        for _ in range(n):
            try:
                data.append(self._next_plain())
            except StopIteration:
                self.ended = True
                break
        if not data or (self.drop_last and len(data) < n):
            raise StopIteration
        return self._collate(data)

    def fetch(self, index):
        """The collated batch for ``index``; StopIteration when an iterable dataset ends."""
        if not self.is_iterable:
            return self._map_batch(index)
        if self.ended:
            raise StopIteration
        return self._stream_batch(index) if self._stream is not None else self._plain_batch(index)

    def recollate(self, exc: BaseException):
        """After handing the last batch over failed (a write request's kernel, writing into
        shared memory): computes each sample's requests on its own under the policy, so only
        the failing samples are lost, and collates the rest again."""
        if self.policy == "raise":
            raise exc
        kept = []
        for sample in self._data:
            try:
                kept.append(materialize(sample))
            except Exception as err:
                key = sample.get("__key__") if isinstance(sample, dict) else None
                self.skips.add(skip_for(err, None, f"sample {key!r}", self.policy))
        return self._collate(kept)
