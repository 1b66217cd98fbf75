"""Write requests: batch leaves whose bytes are computed straight into the buffer they end up in.

Qwen2.5-VL's float32 patches are 24 bytes per pixel — hundreds of MB per batch. Computing each
image's patches into a tensor of its own, concatenating them, then copying the batch into
shared memory writes every byte three times. Instead the pipeline can carry *requests*:

1. ``Qwen2VLTransform.deferred(sample)`` returns the decoded images as a
   :class:`~fastload.vision.PendingPatches` (shape, dtype, ``write_into(out)``), not a tensor;
2. a collator's ``collate_deferred(samples)`` concatenates such leaves as a :class:`Concat`;
3. fastload's loader, which owns the batch's shared-memory segment, calls ``write_into`` on
   each request with its slice of the segment: the kernel writes the patches there, once.

Every step is opt-in and visible: a dataset is asked for deferred samples only when the
collate function has ``collate_deferred``, and ``__call__`` on the transform or the collators
returns ordinary tensors (:func:`materialize`), so torch's DataLoader and any custom collate
function keep working unchanged.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .tree import map_tree


class WriteRequest(Protocol):
    """A leaf of ``shape``/``dtype``/``nbytes`` that computes itself into a given buffer."""

    shape: tuple
    dtype: torch.dtype
    nbytes: int

    def write_into(self, out: torch.Tensor | np.ndarray) -> None: ...

    def tensor(self) -> torch.Tensor: ...


def is_request(x) -> bool:
    """Whether ``x`` is a :class:`WriteRequest` (duck-typed: this runs on every batch leaf)."""
    return not isinstance(x, torch.Tensor) and hasattr(x, "write_into")


class Concat:
    """Tensors and/or write requests to be concatenated along dim 0 — itself a write request,
    so a collator can hand the loader one leaf per batch key."""

    def __init__(self, parts: list[torch.Tensor | WriteRequest]):
        if not parts:
            raise ValueError("Concat needs at least one part")
        self.parts = parts
        self.dtype = parts[0].dtype
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        self.nbytes = sum(p.nbytes for p in parts)

    def write_into(self, out: torch.Tensor) -> None:
        row = 0
        for part in self.parts:
            view = out[row: row + part.shape[0]]
            if is_request(part):
                part.write_into(view)
            else:
                view.copy_(part)
            row += part.shape[0]

    def tensor(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.write_into(out)
        return out


def materialize(tree):
    """``tree`` with every write request computed into a tensor of its own."""
    return map_tree(tree, is_request, lambda request: request.tensor())


class DeferringCollator:
    """Base of collators whose ``collate_deferred(examples)`` (each subclass's own) builds a batch
    with write requests; calling one computes them, so it works as any collate function, in any loader."""

    def __call__(self, examples: list) -> dict:
        return materialize(self.collate_deferred(examples))


def collate_deferred(collate_fn):
    """The form of ``collate_fn`` that may leave write requests in its batch: its
    ``collate_deferred`` method when it has one, else ``collate_fn`` itself."""
    return getattr(collate_fn, "collate_deferred", collate_fn)


def defers(collate_fn) -> bool:
    """Whether ``collate_fn`` takes deferred samples (has a ``collate_deferred`` method)."""
    return callable(getattr(collate_fn, "collate_deferred", None))
