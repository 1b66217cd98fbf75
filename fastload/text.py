"""A shard sample -> the tensors Qwen2.5-VL trains on: chat template, labels, image tokens.

Token counts for images come from the image headers, so a sample's length is known
before any pixel is decoded; only the images of the turns that survive truncation are
decoded. Inside a fastload worker feeding Qwen2VLCollator, ``pixel_values`` stays a
:class:`~fastload.vision.PendingPatches` until the kernel can write it straight into the
batch's shared memory; everywhere else it is an ordinary tensor.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from .decode import as_bytes, check_pixels, read_header
from .errors import check_policy
from .loader.worker import pending_pixels_ok
from .tokenizer import load_tokenizer
from .vision import Qwen2VLImageProcessor, VisionConfig, num_image_tokens

log = logging.getLogger("fastload.text")

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
_IMAGE_KEY = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png|webp|gif|bmp|tif|tiff|mpo)$")

#: Special tokens only the chat template places: the turn delimiters, the vision markers and
#: pads of an image or video slot, and the end-of-text/pad token. Literal in a message, a role or
#: the system prompt, the tokenizer would turn them into the real tokens, forging turn
#: boundaries or image slots (an extra ``<|image_pad|>`` has no image to fill it), so such a
#: sample is a :class:`SampleError`. The other added tokens are text Qwen2.5-VL reads and
#: writes: grounding (``<|object_ref_start|>``, ``<|box_start|>``, ``<|quad_start|>``, ...),
#: ``<tool_call>``, the ``<|fim_*|>`` tokens; they pass through as the reference tokenizes them.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", VISION_START, VISION_END,
                   "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
_RESERVED = re.compile("|".join(map(re.escape, RESERVED_TOKENS)))


class SampleError(ValueError):
    """A sample that cannot become a training example (the message says why)."""


@dataclass
class Turn:
    """One chat message and how many ``<image>`` placeholders its content holds."""

    role: str
    content: str
    images: int


def sample_images(sample: dict) -> list[bytes]:
    """Image members of a shard sample in placeholder order (``jpg``, or ``0.jpg``, ``1.png``, ...)."""
    found = []
    for key, value in sample.items():
        m = _IMAGE_KEY.match(key)
        if m:
            found.append((int(m.group(1) or 0), value))
    return [v for _, v in sorted(found, key=lambda kv: kv[0])]


def sample_messages(sample: dict) -> tuple[list[dict], str | None]:
    if "json" not in sample:
        raise SampleError(f"sample {sample.get('__key__')!r} has no .json record")
    meta = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
    messages = meta.get("messages") or meta.get("conversations")
    if not messages:
        raise SampleError(f"sample {sample.get('__key__')!r} has no messages")
    return messages, meta.get("system")


class Qwen2VLTransform:
    """Maps a raw shard sample to ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values`` and ``image_grid_thw``, as LLaMA-Factory's ``qwen2_vl`` template does.

    Picklable: only the configuration travels; the tokenizer is loaded once per process.
    ``dtype=torch.uint8`` returns the compact wire format (``image_pixels``, the resized
    uint8 images) for :func:`fastload.expand_patches` to expand on the device.
    """

    def __init__(self, processor_dir, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 cutoff_len: int = 4096, train_on_prompt: bool = False, mask_history: bool = False,
                 default_system: str | None = None, dtype: torch.dtype = torch.float32,
                 on_error: str | None = None, exact: bool = False):
        self.processor_dir = str(processor_dir)
        self.cutoff_len, self.train_on_prompt, self.mask_history = cutoff_len, train_on_prompt, mask_history
        self.default_system = DEFAULT_SYSTEM if default_system is None else default_system
        self.dtype, self.on_error = dtype, check_policy(on_error)
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.vision_config = VisionConfig.from_pretrained(self.processor_dir, **overrides)
        self.image_processor = Qwen2VLImageProcessor(
            self.vision_config, exact=exact, dtype=torch.float32 if dtype == torch.uint8 else dtype)
        self.skipped = 0
        self._tok = None

    # -- process-local state ---------------------------------------------------------------
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = None

    def load(self) -> "Qwen2VLTransform":
        """Loads the tokenizer now (e.g. in the parent, so forked workers inherit it)."""
        if self._tok is None:
            self._tok = load_tokenizer(self.processor_dir)
            self._ids = {t: self._tok.token_to_id(t) for t in (VISION_START, IMAGE_PAD, VISION_END)}
        return self

    def encode(self, text: str) -> list[int]:
        return self.load()._tok.encode(text, add_special_tokens=False).ids

    # -- text ------------------------------------------------------------------------------
    def turns(self, sample: dict) -> tuple[list[Turn], list[bytes]]:
        messages, system = sample_messages(sample)
        images = sample_images(sample)
        turns = []
        if messages[0].get("role") != "system":
            turns.append(Turn("system", system if system is not None else self.default_system, 0))
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str) or "role" not in m:
                raise SampleError(f"message without role/content in sample {sample.get('__key__')!r}")
            turns.append(Turn(m["role"], content, content.count(IMAGE_PLACEHOLDER)))
        for turn in turns:
            for field in (turn.role, turn.content):
                found = _RESERVED.search(field) if isinstance(field, str) else None
                if found:
                    raise SampleError(f"sample {sample.get('__key__')!r}: a {turn.role!r} message holds the "
                                      f"special token {found.group()!r}, which only the chat template may place")
        placeholders = sum(t.images for t in turns)
        if placeholders != len(images):
            raise SampleError(f"sample {sample.get('__key__')!r}: {placeholders} <image> placeholders "
                              f"but {len(images)} images")
        return turns, images

    def image_tokens(self, images: list[bytes]) -> list[int]:
        """``<|image_pad|>`` count per image, from headers alone."""
        counts = []
        for data in images:
            header = read_header(as_bytes(data))
            check_pixels(header, self.image_processor.max_image_pixels)
            counts.append(num_image_tokens(*header.size, self.vision_config))
        return counts

    def _turn_ids(self, turn: Turn, pad_counts, key=None) -> tuple[list[int], list[int]]:
        """(prefix ids, body ids) with each image's pad run expanded to its token count."""
        prefix = self.encode(f"<|im_start|>{turn.role}\n")
        body_text = turn.content.replace(IMAGE_PLACEHOLDER, VISION_START + IMAGE_PAD + VISION_END)
        body = []
        for token in self.encode(body_text + "<|im_end|>\n"):
            if token != self._ids[IMAGE_PAD]:
                body.append(token)
                continue
            count = next(pad_counts, None)  # never a bare StopIteration: it could end a loader's epoch
            if count is None:
                raise SampleError(f"sample {key!r}: more {IMAGE_PAD!r} tokens than images")
            body.extend([token] * count)
        return prefix, body

    def _fit(self, turns: list[Turn], lengths: list[int], key) -> int:
        """How many turns to keep: the longest whole-exchange prefix within ``cutoff_len``."""
        ends = [i + 1 for i, t in enumerate(turns) if t.role == "assistant"] or [len(turns)]
        keep = 0
        cumulative = np.cumsum(lengths)
        for end in ends:
            if cumulative[end - 1] <= self.cutoff_len:
                keep = end
        if keep == 0:
            raise SampleError(f"sample {key!r}: the first exchange alone is {int(cumulative[ends[0] - 1])} "
                              f"tokens, over cutoff_len={self.cutoff_len}")
        return keep

    def _labels(self, turns: list[Turn], pieces: list[tuple[list[int], list[int]]]) -> list[int]:
        """Targets are assistant bodies (content + ``<|im_end|>\n``); ``train_on_prompt`` adds
        everything else, ``mask_history`` keeps only the last assistant body."""
        last_assistant = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=-1)
        labels = []
        for i, (turn, (prefix, body)) in enumerate(zip(turns, pieces)):
            if turn.role == "assistant":
                body_is_target = not self.mask_history or i == last_assistant
            else:
                body_is_target = self.train_on_prompt
            labels += prefix if self.train_on_prompt else [IGNORE_INDEX] * len(prefix)
            labels += body if body_is_target else [IGNORE_INDEX] * len(body)
        return labels

    def tokenize(self, sample: dict) -> tuple[list[int], list[int], list[bytes]]:
        """(input_ids, labels, images kept) for a sample, truncated by whole exchanges."""
        turns, images = self.turns(sample)
        pad_counts = iter(self.image_tokens(images))
        pieces = [self._turn_ids(t, pad_counts, sample.get("__key__")) for t in turns]
        keep = self._fit(turns, [len(p) + len(b) for p, b in pieces], sample.get("__key__"))
        turns, pieces = turns[:keep], pieces[:keep]
        ids = [tok for prefix, body in pieces for tok in prefix + body]
        return ids, self._labels(turns, pieces), images[: sum(t.images for t in turns)]

    def num_tokens(self, sample: dict) -> int:
        """Token length of the sample after truncation, without decoding a pixel."""
        return len(self.tokenize(sample)[0])

    # -- pixels ----------------------------------------------------------------------------
    def _pixels(self, images: list[bytes]) -> dict:
        if not images:
            return {}
        proc = self.image_processor
        if self.dtype == torch.uint8:
            wires = [proc.resized(im) for im in images]
            return {"image_pixels": torch.from_numpy(np.concatenate([w.reshape(-1) for w, _ in wires])),
                    "image_grid_thw": torch.tensor([g for _, g in wires], dtype=torch.long)}
        pending = proc.prepare(images)
        pixel_values = pending if pending_pixels_ok() else pending.tensor()
        return {"pixel_values": pixel_values, "image_grid_thw": pending.grid_thw}

    def __call__(self, sample: dict) -> dict | None:
        try:
            ids, labels, images = self.tokenize(sample)
            pixels = self._pixels(images)
        except Exception as exc:
            if self.on_error in (None, "raise"):
                raise  # None: the dataset's or loader's policy decides, and counts the cause
            self.skipped += 1
            if self.on_error == "warn":
                log.warning("skipping sample %r: %s", sample.get("__key__"), exc)
            return None
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "labels": torch.tensor(labels, dtype=torch.long), **pixels}
