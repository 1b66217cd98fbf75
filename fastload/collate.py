"""Batching Qwen2.5-VL examples into the layout ``Qwen2_5_VLForConditionalGeneration.forward`` expects."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .deferred import Concat, DeferringCollator
from .errors import Skip
from .text import IGNORE_INDEX, IMAGE_PAD, VISION_END, VISION_START

_TEXT_KEYS = ("input_ids", "attention_mask", "labels")
_PIXEL_KEYS = ("pixel_values", "image_pixels", "pixel_values_videos")  # large: concatenated as Concat
_GRID_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # small: torch.cat
_MEDIA_KEYS = _PIXEL_KEYS + _GRID_KEYS


def kept_examples(examples: list) -> list[dict]:
    """The transformed samples of a batch, the skipped ones (None, :class:`~fastload.errors.Skip`)
    left out; an error when none is left."""
    kept = [e for e in examples if e is not None and not isinstance(e, Skip)]
    if not kept:
        raise ValueError("cannot collate an empty batch")
    return kept


def concat_media(examples: list[dict]) -> dict:
    """Each image/video key concatenated over the examples in order (along dim 0). The pixel
    keys become :class:`~fastload.deferred.Concat` write requests: whoever owns the batch's
    buffer writes each sample's patches (still pending, if the transform deferred them)
    straight into it."""
    out = {}
    for key in _MEDIA_KEYS:
        parts = [e[key] for e in examples if key in e]
        if parts:
            out[key] = Concat(parts) if key in _PIXEL_KEYS else torch.cat(parts)
    return out


@dataclass(frozen=True)
class DummyImage:
    """LLaMA-Factory's stand-in for a batch without images: a white 64x64 image whose tokens
    are appended to the first row, unattended and untrained, so that every rank runs the vision
    tower each step (a rank that skips it hangs ZeRO-3/FSDP's collectives)."""

    processor_dir: str

    def parts(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(token ids, float32 pixel_values, image_grid_thw) of the dummy image."""
        from .tokenizer import load_tokenizer
        from .vision import Qwen2VLImageProcessor

        proc = Qwen2VLImageProcessor.from_pretrained(self.processor_dir, exact=True)
        out = proc(np.full((64, 64, 3), 255, np.uint8))
        tok = load_tokenizer(self.processor_dir)
        pads = int(out["image_grid_thw"].prod()) // proc.config.merge_size ** 2
        ids = [tok.token_to_id(VISION_START)] + [tok.token_to_id(IMAGE_PAD)] * pads + [tok.token_to_id(VISION_END)]
        return ids, out["pixel_values"].clone(), out["image_grid_thw"]


class Qwen2VLCollator(DeferringCollator):
    """Right-pads the text to the batch's longest (optionally a multiple of ``pad_to_multiple_of``)
    and concatenates images along patches; batches without images omit the image keys (or,
    with ``dummy_image``, carry LLaMA-Factory's dummy image: see :class:`DummyImage`).

    ``pad_token_id=None`` pads ``input_ids`` with 0 — the value is masked by
    ``attention_mask`` and ``labels`` either way; :meth:`from_pretrained` takes the
    tokenizer's pad id. Calling the collator returns tensors; :meth:`collate_deferred` leaves
    the pixel keys as write requests, which fastload's loader computes straight into the
    batch's shared memory (:mod:`fastload.deferred`) — the trainer receives tensors either way.
    """

    def __init__(self, pad_token_id: int | None = None, label_pad_token_id: int = IGNORE_INDEX,
                 pad_to_multiple_of: int | None = None, dummy_image: DummyImage | None = None):
        self.pad_values = {"input_ids": 0 if pad_token_id is None else pad_token_id,
                           "attention_mask": 0, "labels": label_pad_token_id}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dummy_image = dummy_image
        self._dummy = None

    @classmethod
    def from_pretrained(cls, processor_dir, **kwargs) -> "Qwen2VLCollator":
        """Pads with the tokenizer's pad token (its eos when it has none), as transformers' and
        LLaMA-Factory's collators do."""
        from .tokenizer import special_token_id

        pad = special_token_id(processor_dir, "pad_token")
        kwargs.setdefault("pad_token_id", special_token_id(processor_dir, "eos_token") if pad is None else pad)
        return cls(**kwargs)

    @classmethod
    def from_llamafactory(cls, config, **overrides) -> "Qwen2VLCollator":
        """The collator of LLaMA-Factory's SFT workflow for this training YAML (path) or dict:
        the tokenizer's pad id, ``pad_to_multiple_of=8``, its dummy image for text-only batches."""
        from .llamafactory import collator_kwargs, load_config
        from .tokenizer import resolve_processor

        kwargs = collator_kwargs(config)
        processor = resolve_processor(load_config(config)["model_name_or_path"])
        kwargs["dummy_image"] = DummyImage(processor) if kwargs["dummy_image"] else None
        return cls(**{**kwargs, **overrides})

    def __getstate__(self):
        return {**self.__dict__, "_dummy": None}

    def padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return -(-longest // m) * m if m else longest

    def _add_dummy_image(self, examples: list[dict]) -> list[dict]:
        """The first example with the dummy image's tokens appended, unattended and untrained."""
        if self._dummy is None:
            self._dummy = self.dummy_image.parts()
        ids, pixel_values, grid = self._dummy
        first = examples[0]
        extra = torch.tensor(ids, dtype=torch.long)
        first = {**first, "input_ids": torch.cat([first["input_ids"], extra]),
                 "attention_mask": torch.cat([first["attention_mask"], torch.zeros_like(extra)]),
                 "labels": torch.cat([first["labels"], torch.full_like(extra, IGNORE_INDEX)]),
                 "pixel_values": pixel_values, "image_grid_thw": grid}
        return [first] + examples[1:]

    def collate_deferred(self, examples: list[dict]) -> dict:
        """The batch with its pixel keys as :class:`~fastload.deferred.Concat` write requests."""
        examples = kept_examples(examples)
        if self.dummy_image and not any(k in e for e in examples for k in _MEDIA_KEYS):
            examples = self._add_dummy_image(examples)
        length = self.padded_length(max(len(e["input_ids"]) for e in examples))
        batch = {}
        for key in _TEXT_KEYS:
            out = torch.full((len(examples), length), self.pad_values[key], dtype=torch.long)
            for row, e in enumerate(examples):
                out[row, : len(e[key])] = e[key]
            batch[key] = out
        batch.update(concat_media(examples))
        return batch
