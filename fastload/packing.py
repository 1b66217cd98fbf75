"""Packing Qwen2.5-VL samples into rows without padding, each sample still on its own.

Several samples share a row; the model keeps them apart only when given ``position_ids`` of
shape ``(4, rows, L)``: row 0 restarts at 0 for every sample, and transformers builds a
block-diagonal causal mask from it (``find_packed_sequence_indices``; flash-attention varlen
reads the same row), while rows 1-3 are the M-RoPE positions each sample has alone. That holds
only with no ``attention_mask`` and no KV cache: call the model with ``use_cache=False`` (its
config defaults to ``True`` even in training, and with a cache the mask ignores the packing).
A 2-D ``position_ids`` is taken as plain text positions: samples attend to each other.
"""
from __future__ import annotations

import torch

from .budget import PackedPlanner, SampleTooLong, first_fit_decreasing, round_up
from .collate import concat_media, kept_examples
from .deferred import DeferringCollator
from .mrope import IMAGE_TOKEN_ID, SPATIAL_MERGE_SIZE, TOKENS_PER_SECOND, VIDEO_TOKEN_ID, rope_index
from .text import IGNORE_INDEX

class Qwen2VLPackingCollator(DeferringCollator):
    """Packs transformed samples (:class:`~fastload.Qwen2VLTransform` output) into rows of at
    most ``max_length`` tokens, first-fit decreasing; ``max_length=None`` makes one row.

    Returns ``input_ids``, ``labels`` (each sample's first label masked, so no sample learns
    to predict its neighbour's first token), ``position_ids`` of shape ``(4, rows, L)``,
    ``pixel_values``/``image_grid_thw`` (and the video keys) in the order their samples sit in
    the rows (``tokens_per_second``: the model's ``vision_config.tokens_per_second``), and for
    flash-attention varlen users ``seq_lens`` (each sample's length, in row order) and
    ``cu_seq_lens`` (int32 offsets into the flattened rows, a row's padding tail being a
    sequence of its own). No ``attention_mask``: the packed mask comes from the positions.
    (Not ``cu_seqlens``: the vision tower takes that keyword from ``model(**batch)``.)

    Rows are padded to the longest (to a multiple of ``pad_to_multiple_of``); padding has
    ``pad_token_id`` (default 0), label -100, and positions counting from 0. A sample longer
    than ``max_length`` raises :class:`~fastload.budget.SampleTooLong`: keep the transform's
    ``cutoff_len`` within it, or let ``DataLoader(max_tokens=..., on_error="skip")`` skip and
    count such samples before they reach the collator.
    """

    def __init__(self, max_length: int | None = None, *, pad_token_id: int | None = None,
                 label_pad_token_id: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None,
                 image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID,
                 spatial_merge_size: int = SPATIAL_MERGE_SIZE, tokens_per_second: int = TOKENS_PER_SECOND):
        if max_length is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(f"max_length={max_length} must be a multiple of pad_to_multiple_of="
                             f"{pad_to_multiple_of}, or padded rows would outgrow it")
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.label_pad_token_id = label_pad_token_id
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.spatial_merge_size, self.tokens_per_second = spatial_merge_size, tokens_per_second

    def token_planner(self, max_tokens: int, max_samples: int) -> PackedPlanner:
        """How ``DataLoader(max_tokens=...)`` forms batches for this collator: at most
        ``max_tokens // max_length`` rows (one row of ``max_tokens`` when ``max_length`` is None)."""
        return PackedPlanner(max_tokens, max_samples, self.max_length, self.pad_to_multiple_of)

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the samples in each row, first-fit decreasing (in order within a row)."""
        if self.max_length is None:
            return [list(range(len(lengths)))]
        longest = max(lengths)
        if longest > self.max_length:
            raise SampleTooLong(f"a sample of {longest} tokens is longer than max_length={self.max_length}")
        bins, _ = first_fit_decreasing(lengths, self.max_length)
        return [sorted(b) for b in bins]

    def collate_deferred(self, examples: list[dict]) -> dict:
        """The packed batch with its pixel keys as write requests (see :mod:`fastload.deferred`)."""
        examples = kept_examples(examples)
        rows = [[examples[i] for i in row] for row in self.rows([len(e["input_ids"]) for e in examples])]
        width = round_up(max(sum(len(e["input_ids"]) for e in row) for row in rows), self.pad_to_multiple_of)
        batch = {"input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((len(rows), width), self.label_pad_token_id, dtype=torch.long),
                 "position_ids": torch.empty((4, len(rows), width), dtype=torch.long)}
        bounds = [0]
        for r, row in enumerate(rows):
            end = 0
            for e in row:
                end = self._place(batch, r, end, e)
                bounds.append(r * width + end)
            batch["position_ids"][:, r, end:] = torch.arange(width - end)  # the padding tail: a sequence of its own
            if end < width:
                bounds.append((r + 1) * width)
        batch["seq_lens"] = torch.tensor([len(e["input_ids"]) for row in rows for e in row], dtype=torch.int32)
        batch["cu_seq_lens"] = torch.tensor(bounds, dtype=torch.int32)
        batch.update(concat_media([e for row in rows for e in row]))
        return batch

    def _place(self, batch: dict, r: int, start: int, example: dict) -> int:
        """Writes one sample at ``start`` of row ``r``; returns where it ends."""
        ids = example["input_ids"]
        end = start + len(ids)
        batch["input_ids"][r, start:end] = ids
        batch["labels"][r, start:end] = example["labels"]
        batch["labels"][r, start] = self.label_pad_token_id
        batch["position_ids"][0, r, start:end] = torch.arange(len(ids))
        batch["position_ids"][1:, r, start:end] = rope_index(
            ids, example.get("image_grid_thw"), example.get("video_grid_thw"), example.get("second_per_grid_ts"),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.spatial_merge_size, tokens_per_second=self.tokens_per_second)[0]
        return end
