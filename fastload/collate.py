"""Batching Qwen2.5-VL examples into the layout ``Qwen2_5_VLForConditionalGeneration.forward`` expects."""
from __future__ import annotations

import torch

from .loader.shm import Concat
from .loader.worker import in_worker
from .text import IGNORE_INDEX

_TEXT_KEYS = ("input_ids", "attention_mask", "labels")
_IMAGE_KEYS = ("pixel_values", "image_pixels", "image_grid_thw")


class Qwen2VLCollator:
    """Right-pads the text to the batch's longest (optionally a multiple of ``pad_to_multiple_of``)
    and concatenates images along patches; batches without images omit the image keys.

    ``pad_token_id=None`` pads ``input_ids`` with 0 — the value is masked by
    ``attention_mask`` and ``labels`` either way. Inside a fastload worker the image keys
    are handed over as :class:`~fastload.loader.shm.Concat`, which the loader writes
    straight into shared memory; the trainer receives ordinary tensors.
    """

    accepts_pending_pixels = True  # see fastload.loader.worker.pending_pixels_ok

    def __init__(self, pad_token_id: int | None = None, label_pad_token_id: int = IGNORE_INDEX,
                 pad_to_multiple_of: int | None = None):
        self.pad_values = {"input_ids": 0 if pad_token_id is None else pad_token_id,
                           "attention_mask": 0, "labels": label_pad_token_id}
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return -(-longest // m) * m if m else longest

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        examples = [e for e in examples if e is not None]
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = self.padded_length(max(len(e["input_ids"]) for e in examples))
        batch = {}
        for key in _TEXT_KEYS:
            out = torch.full((len(examples), length), self.pad_values[key], dtype=torch.long)
            for row, e in enumerate(examples):
                out[row, : len(e[key])] = e[key]
            batch[key] = out
        for key in _IMAGE_KEYS:
            parts = [e[key] for e in examples if key in e]
            if not parts:
                continue
            if in_worker():  # written once, straight into the batch's shared memory
                batch[key] = Concat(parts)
            else:
                batch[key] = torch.cat([p.tensor() if hasattr(p, "write_into") else p for p in parts])
        return batch
