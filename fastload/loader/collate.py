"""torch's ``default_collate``, stacking tensors into ordinary memory.

Inside a torch worker, ``default_collate`` stacks a batch's tensors into a new torch
shared-memory block (its way of handing the batch over). A fastload worker copies every
batch into its own segment anyway, so that block would cost ``/dev/shm`` twice and one more
copy — and fail outright when ``/dev/shm`` is small. Values, dtypes and structure are torch's;
write requests (:mod:`fastload.deferred`, e.g. a transform's deferred pixels) are computed first.
"""
from __future__ import annotations

import torch
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

from ..deferred import materialize


def _stack(batch, *, collate_fn_map=None):
    if batch[0].is_nested or batch[0].layout != torch.strided:
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)  # torch's errors
    return torch.stack(batch, 0)


_MAP = {**default_collate_fn_map, torch.Tensor: _stack}


def default_collate(batch):
    """``torch.utils.data.default_collate`` without the shared-memory output."""
    return collate(materialize(batch), collate_fn_map=_MAP)
