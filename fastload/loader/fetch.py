"""Turning an index (or, for iterable datasets, the next items) into a collated batch.

torch's fetchers, plus an ``on_error`` policy: with ``"skip"``/``"warn"`` a sample whose
loading raises is left out of its batch and counted, instead of failing the run.
"""
from __future__ import annotations

import logging
import traceback

log = logging.getLogger("fastload.loader")

#: Returned when every sample of a batch was skipped: the loader moves on to the next one.
EMPTY = object()


class Fetcher:
    """Fetches batches for one process (the main one, or a worker)."""

    def __init__(self, dataset, is_iterable: bool, auto_collation: bool, collate_fn, drop_last: bool,
                 on_error: str = "raise"):
        self.dataset, self.is_iterable = dataset, is_iterable
        self.auto_collation, self.collate_fn, self.drop_last = auto_collation, collate_fn, drop_last
        self.on_error = on_error
        self.skipped = 0
        self.ended = False
        self._it = None

    def start(self, skip_samples: int = 0, skip_batches: int = 0, batch_size: int = 1) -> None:
        """(Re)starts an iterable dataset's stream, fast-forwarding for an exact resume.

        Datasets with ``iter_from(n)`` (``ShardDataset``) skip ``n`` raw samples cheaply;
        others are replayed batch by batch and the batches dropped.
        """
        self.ended = False
        if not self.is_iterable:
            return
        if skip_samples and hasattr(self.dataset, "iter_from"):
            self._it = iter(self.dataset.iter_from(skip_samples))
            return
        self._it = iter(self.dataset)
        try:
            for _ in range(skip_batches):
                self.fetch([None] * batch_size if self.auto_collation else None)
        except StopIteration:
            pass

    def _skip(self, what: str, exc: BaseException) -> None:
        self.skipped += 1
        if self.on_error == "warn":
            log.warning("skipping %s: %s\n%s", what, exc, "".join(traceback.format_exception(exc)[-3:]))

    def _item(self, index):
        if self.on_error == "raise":
            return self.dataset[index]
        try:
            return self.dataset[index]
        except Exception as exc:
            self._skip(f"sample {index!r}", exc)
            return EMPTY

    def _next_item(self):
        while True:
            if self.on_error == "raise":
                return next(self._it)
            try:
                return next(self._it)
            except StopIteration:
                raise
            except Exception as exc:
                self._skip("an item of the iterable dataset", exc)

    def _map_batch(self, index):
        if not self.auto_collation:
            item = self._item(index)
            return item if item is EMPTY else self.collate_fn(item)
        if self.on_error == "raise" and getattr(self.dataset, "__getitems__", None):
            data = self.dataset.__getitems__(index)
        else:
            data = [x for x in (self._item(i) for i in index) if x is not EMPTY]
        return self.collate_fn(data) if data else EMPTY

    def _iterable_batch(self, index):
        if self.ended:
            raise StopIteration
        if not self.auto_collation:
            return self.collate_fn(self._next_item())
        data = []
        for _ in index:
            try:
                data.append(self._next_item())
            except StopIteration:
                self.ended = True
                break
        if not data or (self.drop_last and len(data) < len(index)):
            raise StopIteration
        return self.collate_fn(data)

    def fetch(self, index):
        """The collated batch for ``index``; StopIteration when an iterable dataset ends."""
        if self.is_iterable:
            return self._iterable_batch(index)
        return self._map_batch(index)

    @property
    def skipped_total(self) -> int:
        """Samples skipped so far: by ``on_error`` here, or by the dataset's own transform
        (``ShardDataset`` + ``Qwen2VLTransform(on_error="skip")``)."""
        transform = getattr(self.dataset, "transform", None)
        return self.skipped + getattr(transform, "skipped", 0)

    @property
    def consumed(self):
        """Raw samples an iterable dataset's stream has produced so far, when it tracks that."""
        return getattr(self.dataset, "consumed", None)
