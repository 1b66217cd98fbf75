"""Qwen2.5-VL's 3-D rotary positions (M-RoPE), computed per sample in the worker.

The model computes them in its forward pass (``get_rope_index``: a Python loop over the batch on
the trainer's GPU stream) unless it is given ``position_ids``. Here they come from what the
worker already has, ``input_ids``, each image's and video's grid and each video's
``second_per_grid_ts``, as transformers 5.x ``get_rope_index`` lays them out: text tokens count
up on all three rows; an image's or video's tokens take ``start + (t', h, w)`` over its merged
grid, where ``t'`` is the temporal patch index for an image and, for a video,
``int(t * tokens_per_second * second_per_grid_t)`` (in float32, as the model computes it: real
time, so a video sampled at another rate keeps its clock); the text after either resumes at
``start + max(h, w)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .collate import Qwen2VLCollator

#: Qwen2.5-VL's ``<|image_pad|>`` and ``<|video_pad|>`` ids, spatial merge size, and the
#: ``vision_config.tokens_per_second`` of its released checkpoints (transformers' class default is 4).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
SPATIAL_MERGE_SIZE = 2
TOKENS_PER_SECOND = 2


def rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, *,
               image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID,
               spatial_merge_size: int = SPATIAL_MERGE_SIZE, tokens_per_second: int = TOKENS_PER_SECOND
               ) -> tuple[torch.Tensor, int]:
    """``(positions, delta)`` of one unpadded sample: positions of shape ``(3, len)`` (temporal,
    height, width) and ``delta = positions.max() + 1 - len``, as ``get_rope_index`` returns
    them for that sample alone (its ``rope_deltas`` entry). ``second_per_grid_ts`` holds one
    value per video (1 each when None, as the model assumes)."""
    ids = np.asarray(input_ids)
    pos = np.empty((3, len(ids)), np.int64)
    media = [_Media(ids, image_token_id, image_grid_thw, "image", None),
             _Media(ids, video_token_id, video_grid_thw, "video", second_per_grid_ts)]
    token = current = 0
    while any(m.pending() for m in media):
        item = min((m for m in media if m.pending()), key=lambda m: m.next_at())
        start, temporal, (gh, gw) = item.take(spatial_merge_size, tokens_per_second)
        count = len(temporal) * gh * gw
        pos[:, token:start] = np.arange(current, current + start - token)
        current += start - token
        grid = np.indices((len(temporal), gh, gw)).reshape(3, -1)
        grid[0] = temporal[grid[0]]
        pos[:, start:start + count] = grid + current
        current += max(gh, gw)
        token = start + count
    for m in media:
        m.check_used(spatial_merge_size)
    pos[:, token:] = np.arange(current, current + len(ids) - token)
    delta = int(pos.max()) + 1 - len(ids) if len(ids) else 0
    return torch.from_numpy(pos), delta


class _Media:
    """One kind of vision token (images or videos) of a sample: where its tokens are, its grids
    in order, and how many tokens the grids taken so far cover."""

    def __init__(self, ids: np.ndarray, token_id: int, grid_thw, kind: str, second_per_grid_ts):
        self.at, self.kind, self.used = np.flatnonzero(ids == token_id), kind, 0
        self.grids = [] if grid_thw is None else np.asarray(grid_thw).reshape(-1, 3).tolist()
        self.seconds = (None if second_per_grid_ts is None
                        else torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1))
        self.taken = 0

    def pending(self) -> bool:
        return self.used < len(self.at)

    def next_at(self) -> int:
        return int(self.at[self.used])

    def take(self, merge: int, tokens_per_second: int) -> tuple[int, np.ndarray, tuple[int, int]]:
        """(first token, temporal position of each temporal patch, merged (h, w)) of the next item."""
        if self.taken == len(self.grids):
            raise ValueError(f"{len(self.at)} {self.kind} tokens but {self.kind}_grid_thw accounts for {self.used}")
        t, h, w = self.grids[self.taken]
        gh, gw = h // merge, w // merge
        start, count = self.next_at(), t * gh * gw
        if self.used + count > len(self.at) or self.at[self.used + count - 1] != start + count - 1:
            raise ValueError(f"the {self.kind} tokens at {start} are not one run of {count}")
        temporal = np.arange(t)
        if self.kind == "video":  # the model's float32 arithmetic, truncated as .long() does
            second = self.seconds[self.taken] if self.seconds is not None else 1
            temporal = (torch.arange(t) * (tokens_per_second * second)).long().numpy()
        self.used, self.taken = self.used + count, self.taken + 1
        return start, temporal, (gh, gw)

    def check_used(self, merge: int) -> None:
        """Every token and every grid taken: neither side has one the other lacks."""
        if self.used != len(self.at):
            raise ValueError(f"{len(self.at)} {self.kind} tokens but {self.kind}_grid_thw accounts for {self.used}")
        if self.taken != len(self.grids):
            need = sum(t * (h // merge) * (w // merge) for t, h, w in self.grids)
            raise ValueError(f"{self.kind}_grid_thw needs {need} {self.kind} tokens, input_ids hold {len(self.at)}")


def batch_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw=None,
                     video_grid_thw=None, second_per_grid_ts=None, *, image_token_id: int = IMAGE_TOKEN_ID,
                     video_token_id: int = VIDEO_TOKEN_ID, spatial_merge_size: int = SPATIAL_MERGE_SIZE,
                     tokens_per_second: int = TOKENS_PER_SECOND) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids (3, batch, seq), rope_deltas (batch, 1))`` of a padded batch, as
    ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
    second_per_grid_ts, attention_mask)`` gives them: each row's attended tokens in order, its
    images and videos taking the next grids, padding at 0."""
    positions = torch.zeros((3, *input_ids.shape), dtype=torch.long)
    deltas = torch.zeros((len(input_ids), 1), dtype=torch.long)
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    grids = {k: torch.zeros((0, 3), dtype=torch.long) if g is None else torch.as_tensor(g) for k, g in grids.items()}
    seconds = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).reshape(-1)
    used = {"image": 0, "video": 0}
    for row, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool())):
        ids = ids[mask]
        counts = {"image": _runs(ids, image_token_id), "video": _runs(ids, video_token_id)}
        take = {k: slice(used[k], used[k] + counts[k]) for k in used}
        pos, deltas[row, 0] = rope_index(
            ids, grids["image"][take["image"]], grids["video"][take["video"]],
            None if seconds is None else seconds[take["video"]], image_token_id=image_token_id,
            video_token_id=video_token_id, spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second)
        positions[:, row, mask] = pos
        used = {k: used[k] + counts[k] for k in used}
    return positions, deltas


def _runs(ids: torch.Tensor, token_id: int) -> int:
    """How many runs of ``token_id`` the ids hold: one per image or video."""
    hit = (ids == token_id).numpy()
    return int(hit[0]) + int((hit[1:] & ~hit[:-1]).sum()) if len(hit) else 0


class Qwen2VLRopeCollator(Qwen2VLCollator):
    """:class:`~fastload.Qwen2VLCollator` that also returns ``position_ids`` of shape
    ``(3, batch, seq)`` and ``rope_deltas`` of shape ``(batch, 1)`` (:func:`batch_rope_index`),
    computed in the worker, so the model skips ``get_rope_index`` in its forward.
    ``tokens_per_second`` is the model's ``vision_config.tokens_per_second``."""

    def __init__(self, *args, image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID,
                 spatial_merge_size: int = SPATIAL_MERGE_SIZE, tokens_per_second: int = TOKENS_PER_SECOND,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.spatial_merge_size, self.tokens_per_second = spatial_merge_size, tokens_per_second

    def collate_deferred(self, examples: list[dict]) -> dict:
        batch = super().collate_deferred(examples)
        batch["position_ids"], batch["rope_deltas"] = batch_rope_index(
            batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
            batch.get("video_grid_thw"), batch.get("second_per_grid_ts"),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.spatial_merge_size, tokens_per_second=self.tokens_per_second)
        return batch
