"""Qwen2.5-VL's 3-D rotary positions (M-RoPE), computed per sample in the worker.

The model computes them in its forward pass (``get_rope_index``: a Python loop over the batch on
the trainer's GPU stream) unless it is given ``position_ids``. Here they come from what the
worker already has, ``input_ids`` and each image's grid: text tokens count up on all three rows;
an image's tokens take ``start + (t, h, w)`` over its merged grid; the text after an image
resumes at ``start + max(h, w)`` (transformers 5.x ``get_rope_index`` for still images;
``max + 1`` of the image's positions in 4.x, the same number). Videos are not handled: fastload
has no video path.
"""
from __future__ import annotations

import numpy as np
import torch

from .collate import Qwen2VLCollator

#: Qwen2.5-VL's ``<|image_pad|>`` id and spatial merge size (its config's defaults).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656  # <|video_pad|>: refused below, as the video positions are not computed here
SPATIAL_MERGE_SIZE = 2


def rope_index(input_ids, image_grid_thw=None, *, image_token_id: int = IMAGE_TOKEN_ID,
               spatial_merge_size: int = SPATIAL_MERGE_SIZE) -> tuple[torch.Tensor, int]:
    """``(positions, delta)`` of one unpadded sample: positions of shape ``(3, len)`` (temporal,
    height, width) and ``delta = positions.max() + 1 - len``, as ``get_rope_index`` returns
    them for that sample alone (its ``rope_deltas`` entry)."""
    ids = np.asarray(input_ids)
    if np.any(ids == VIDEO_TOKEN_ID):
        raise ValueError("rope_index (and so packing and Qwen2VLRopeCollator) handles still images only: this "
                         "sample has video tokens; use Qwen2VLCollator and let the model compute positions")
    pos = np.empty((3, len(ids)), np.int64)
    image_at = np.flatnonzero(ids == image_token_id)
    grids = [] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3).tolist()
    token = current = used = 0
    for t, h, w in grids:
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        start = _image_run(image_at, used, count)
        pos[:, token:start] = np.arange(current, current + start - token)
        current += start - token
        pos[:, start:start + count] = np.indices((t, gh, gw)).reshape(3, -1) + current
        current += max(gh, gw)
        token, used = start + count, used + count
    if used != len(image_at):
        raise ValueError(f"{len(image_at)} image tokens but image_grid_thw accounts for {used}")
    pos[:, token:] = np.arange(current, current + len(ids) - token)
    delta = int(pos.max()) + 1 - len(ids) if len(ids) else 0
    return torch.from_numpy(pos), delta


def _image_run(image_at: np.ndarray, used: int, count: int) -> int:
    """Where the next image's ``count`` tokens start; they must be one contiguous run."""
    if used + count > len(image_at):
        raise ValueError(f"image_grid_thw needs {used + count} image tokens, input_ids hold {len(image_at)}")
    start = int(image_at[used])
    if image_at[used + count - 1] != start + count - 1:
        raise ValueError(f"the image tokens at {start} are not one run of {count}")
    return start


def batch_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw=None, *,
                     image_token_id: int = IMAGE_TOKEN_ID, spatial_merge_size: int = SPATIAL_MERGE_SIZE
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids (3, batch, seq), rope_deltas (batch, 1))`` of a padded batch, as
    ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask)`` gives them:
    each row's attended tokens in order, its images taking the next grids, padding at 0."""
    positions = torch.zeros((3, *input_ids.shape), dtype=torch.long)
    deltas = torch.zeros((len(input_ids), 1), dtype=torch.long)
    grids = torch.zeros((0, 3), dtype=torch.long) if image_grid_thw is None else image_grid_thw
    used = 0
    for row, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool())):
        ids = ids[mask]
        is_image = (ids == image_token_id).numpy()
        images = int(is_image[0]) + int((is_image[1:] & ~is_image[:-1]).sum()) if len(ids) else 0
        pos, deltas[row, 0] = rope_index(ids, grids[used:used + images], image_token_id=image_token_id,
                                         spatial_merge_size=spatial_merge_size)
        positions[:, row, mask] = pos
        used += images
    return positions, deltas


class Qwen2VLRopeCollator(Qwen2VLCollator):
    """:class:`~fastload.Qwen2VLCollator` that also returns ``position_ids`` of shape
    ``(3, batch, seq)`` and ``rope_deltas`` of shape ``(batch, 1)`` (:func:`batch_rope_index`),
    computed in the worker, so the model skips ``get_rope_index`` in its forward."""

    def __init__(self, *args, image_token_id: int = IMAGE_TOKEN_ID,
                 spatial_merge_size: int = SPATIAL_MERGE_SIZE, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_token_id, self.spatial_merge_size = image_token_id, spatial_merge_size

    def collate_deferred(self, examples: list[dict]) -> dict:
        batch = super().collate_deferred(examples)
        batch["position_ids"], batch["rope_deltas"] = batch_rope_index(
            batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
            image_token_id=self.image_token_id,
            spatial_merge_size=self.spatial_merge_size)
        return batch
