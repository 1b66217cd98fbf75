"""The LLaMA-Factory preset: what LLaMA-Factory 0.9.5's ``qwen2_vl`` pipeline feeds the model.

``Qwen2VLTransform.from_llamafactory(config)`` and ``Qwen2VLCollator.from_llamafactory(config)``
take the training YAML (a path) or its arguments (a dict) and reproduce, sample for sample:

- **Template** (``template: qwen2_vl``): each message's slot tokenized on its own; the first
  message carries the system prompt (the sample's, or ``default_system``, or "You are a helpful
  assistant." when it is absent *or empty*) and the tool definitions; ``function_call`` turns are
  trained ``<tool_call>`` blocks, ``observation`` turns user ``<tool_response>`` turns.
- **Samples LLaMA-Factory drops** (roles out of user/assistant order, a conversation ending with
  a user turn): a counted skip with the reason (``loader.stats["by_cause"]``).
- **Truncation**: ``cutoff_len`` split between each prompt and answer by ``infer_seqlen``, the
  last exchanges first with ``mask_history``.
- **Images**: Pillow bicubic to ``image_max_pixels`` / ``image_min_pixels``
  (``int(w * sqrt(max / (w * h)))``), Qwen2-VL's 28-pixel and aspect-ratio fixes, then
  ``smart_resize``, all in the kernel on the decoded pixels (no re-encoding); no EXIF
  orientation, and alpha dropped rather than composited, as LLaMA-Factory does.
- **Videos** (``Qwen2VLPlugin._regularize_videos``): ``video_fps`` frames per second of the
  header's duration, at most ``video_maxlen``, spread by ``np.linspace`` over the header's frame
  count; each frame Pillow-bicubic to ``video_max_pixels`` / ``video_min_pixels`` with the same
  fixes as images, then ``smart_resize``; an odd count repeats the last frame;
  ``second_per_grid_ts`` from the sampled count over the header's duration. No rotation
  metadata applied (LLaMA-Factory's ``frame.to_image()`` applies none).
- **Collation**: the tokenizer's pad id, a multiple of 8, and LLaMA-Factory's dummy 64x64 image
  in a batch without images (its guard against ZeRO-3/FSDP hangs).

Where the preset deliberately differs:

- **An image's tokens are never cut.** Where ``cutoff_len`` ends inside an image's
  ``<|image_pad|>`` run, LLaMA-Factory trains on a sample the model rejects ("Image features and
  image tokens do not match"); fastload skips it, counted under "cutoff_len cuts an image's
  tokens". Images whose tokens are cut away whole are left out of ``pixel_values`` (LLaMA-Factory
  still passes them, with the same error), the tokens staying identical.
- **Pixels** equal transformers' PIL backend bit for bit; LLaMA-Factory loads the torchvision
  backend where torchvision is installed, which differs from PIL by backend noise (≈0.1).
- **Videos without a frame count or duration in their header** (WebM/Matroska may have
  neither; LLaMA-Factory then samples ``video_maxlen`` frames whatever the length, or fails):
  a clear :class:`~fastload.video.VideoDecodeError`, as is a header claiming frames the
  stream does not have (LLaMA-Factory silently trains on fewer frames than tokens).
- **Not reproduced**: packing (see ``fastload.packing``), audio (skipped when sharding),
  ``tokenized_path`` (fastload tokenizes in the loader: nothing to cache),
  ``position_ids`` (the model computes them, as it does when LLaMA-Factory passes none).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import simplejpeg

from .decode import decode
from .header import Header, _open_pillow, check_pixels
from .text import IGNORE_INDEX, Block, Conversation, DroppedSample, Encoded, tool_call_text, tool_prompt, \
    with_image_slots
from .tokenizer import resolve_processor, special_token_id
from .video import VideoDecodeError, VideoInfo
from .video_processor import VideoConfig
from .vision import resize_rgb

log = logging.getLogger("fastload.llamafactory")

#: LLaMA-Factory 0.9.5's defaults for the arguments the preset reads.
DEFAULTS = {"template": None, "cutoff_len": 2048, "image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32,
            "mask_history": False, "train_on_prompt": False, "default_system": None, "tool_format": None,
            "dataset": None, "dataset_dir": "data", "media_dir": None, "ignore_pad_token_for_loss": True,
            "do_train": True, "split_special_tokens": False, "packing": None, "neat_packing": False}
TEMPLATES = ("qwen2_vl",)
#: ... and for videos (LLaMA-Factory's ``ModelArguments``).
VIDEO_DEFAULTS = {"video_fps": 2.0, "video_maxlen": 128, "video_max_pixels": 256 * 256, "video_min_pixels": 16 * 16}
_IGNORED = ("tokenized_path", "preprocessing_num_workers", "overwrite_cache", "streaming")


def load_config(config: str | os.PathLike | dict) -> dict:
    """A training YAML (path) or argument dict, with LLaMA-Factory's defaults filled in and
    the settings the preset cannot reproduce refused."""
    if not isinstance(config, dict):
        import yaml

        with open(config) as f:
            config = yaml.safe_load(f) or {}
    cfg = {**DEFAULTS, **config}
    if cfg["template"] not in TEMPLATES:
        raise ValueError(f"the LLaMA-Factory preset reproduces template {TEMPLATES[0]!r} "
                         f"(Qwen2-VL / Qwen2.5-VL), got template={cfg['template']!r}")
    if cfg["tool_format"] not in (None, "qwen"):
        raise ValueError(f"tool_format={cfg['tool_format']!r}: the preset renders tools in qwen's format only")
    if cfg["split_special_tokens"]:
        raise ValueError("split_special_tokens=True is not reproduced (fastload refuses literal special tokens)")
    if cfg["mask_history"] and cfg["train_on_prompt"]:
        raise ValueError("`mask_history` is incompatible with `train_on_prompt` (as in LLaMA-Factory)")
    if "model_name_or_path" not in cfg:
        raise ValueError("the config has no model_name_or_path (the processor to load)")
    for key in _IGNORED:
        if cfg.get(key) is not None:
            log.info("LLaMA-Factory preset: %s is ignored (fastload tokenizes in the loader)", key)
    if cfg["packing"] or cfg["neat_packing"]:
        log.warning("LLaMA-Factory preset: packing is not part of the preset; samples come unpacked")
    return cfg


def transform_kwargs(config) -> dict:
    """``Qwen2VLTransform`` arguments reproducing the config's pipeline (``exact`` pixels)."""
    cfg = load_config(config)
    return {"processor_dir": cfg["model_name_or_path"], "cutoff_len": cfg["cutoff_len"],
            "mask_history": cfg["mask_history"], "train_on_prompt": cfg["train_on_prompt"],
            "default_system": cfg["default_system"], "template": LlamaFactoryTemplate(), "exact": True,
            "pre_resize": LlamaFactoryImages(cfg["image_max_pixels"], cfg["image_min_pixels"]),
            "video": video_config(cfg)}


def video_config(cfg: dict) -> VideoConfig:
    """The video settings of a loaded config: the processor folder's patch layout and pixel
    budget (what LLaMA-Factory's video processor resizes with), LLaMA-Factory's sampling."""
    video = {**VIDEO_DEFAULTS, **{k: v for k, v in cfg.items() if k in VIDEO_DEFAULTS}}
    sampler = LlamaFactoryVideos(video["video_fps"], video["video_maxlen"],
                                 LlamaFactoryImages(video["video_max_pixels"], video["video_min_pixels"]))
    return VideoConfig.from_pretrained(cfg["model_name_or_path"], sampler=sampler, cap_pixels_per_frame=False)


def collator_kwargs(config) -> dict:
    """``Qwen2VLCollator`` arguments as LLaMA-Factory's SFT workflow builds its collator: the
    tokenizer's pad id (its eos, ``<|im_end|>`` for qwen2_vl, where it has none)."""
    cfg = load_config(config)
    processor = resolve_processor(cfg["model_name_or_path"])
    pad = special_token_id(processor, "pad_token")
    if pad is None:
        from .tokenizer import load_tokenizer

        pad = load_tokenizer(processor).token_to_id("<|im_end|>")
    return {"pad_token_id": pad, "label_pad_token_id": IGNORE_INDEX if cfg["ignore_pad_token_for_loss"] else pad,
            "pad_to_multiple_of": 8 if cfg["do_train"] else None, "dummy_image": True}


def shard_inputs(config) -> tuple[str, list[str], str]:
    """(dataset_info.json path, dataset names, media folder) for ``fastload-shard``."""
    cfg = load_config(config)
    if not cfg["dataset"]:
        raise ValueError("the config names no dataset")
    names = cfg["dataset"] if isinstance(cfg["dataset"], list) else [n.strip() for n in cfg["dataset"].split(",")]
    return os.path.join(cfg["dataset_dir"], "dataset_info.json"), names, cfg["media_dir"] or cfg["dataset_dir"]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a token budget between a prompt and its answer."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


_PROMPT_ROLES, _ANSWER_ROLES = ("user", "observation"), ("assistant", "function_call")


class LlamaFactoryTemplate:
    """LLaMA-Factory's ``qwen2_vl`` template and ``SupervisedDatasetProcessor`` truncation."""

    name = "llamafactory"

    @staticmethod
    def _slot(role: str, content: str) -> str:
        content = with_image_slots(content)
        if role == "user":
            return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        if role == "observation":
            return (f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n")
        if role == "function_call":
            return tool_call_text(content) + "<|im_end|>\n"
        return content + "<|im_end|>\n"

    @staticmethod
    def _check_roles(conv: Conversation, turns) -> None:
        """LLaMA-Factory's converter: prompts and answers alternate, ending with an answer."""
        for i, turn in enumerate(turns):
            if turn.role not in (_PROMPT_ROLES, _ANSWER_ROLES)[i % 2]:
                raise DroppedSample("LLaMA-Factory drops: roles out of order",
                                    f"sample {conv.key!r}: message {i} is {turn.role!r}; LLaMA-Factory "
                                    "needs user/observation and assistant/function_call turns in turn")
        if not turns or len(turns) % 2:
            raise DroppedSample("LLaMA-Factory drops: no answer at the end",
                                f"sample {conv.key!r} ends with a {turns[-1].role if turns else 'missing'!r} "
                                "turn; LLaMA-Factory drops such samples")

    def blocks(self, conv: Conversation, default_system: str) -> list[Block]:
        turns, system = conv.turns, conv.system or ""
        if turns and turns[0].role == "system":
            turns, system = turns[1:], turns[0].content
        self._check_roles(conv, turns)
        system, tools = system or default_system, tool_prompt(conv.tools)
        blocks = []
        for i, turn in enumerate(turns):
            head = f"<|im_start|>system\n{system + tools}<|im_end|>\n" if i == 0 and (system or tools) else ""
            blocks.append(Block(head + self._slot(turn.role, turn.content), 0 if i % 2 else None))
        return blocks

    @staticmethod
    def truncate(encoded: list[Encoded], cutoff_len: int, mask_history: bool, key) -> list[int]:
        """Kept length per block: each (prompt, answer) pair cut to ``infer_seqlen``'s share of
        what is left, the last pair first with ``mask_history``; none once the budget is gone."""
        pairs = [(i, i + 1) for i in range(0, len(encoded), 2)]
        lengths, total = [0] * len(encoded), 0
        for s, t in reversed(pairs) if mask_history else pairs:
            if total >= cutoff_len:
                break
            lengths[s], lengths[t] = infer_seqlen(len(encoded[s].ids), len(encoded[t].ids), cutoff_len - total)
            total += lengths[s] + lengths[t]
        return lengths


_KERNEL_MODES = ("RGB", "L")  # resized per channel alike, so resizing RGB equals LLaMA-Factory's order


@dataclass(frozen=True)
class LlamaFactoryImages:
    """LLaMA-Factory's image regularization for Qwen2-VL (``Qwen2VLPlugin._preprocess_image``) as
    a :class:`~fastload.vision.PreResize`: no EXIF orientation; Pillow bicubic down to
    ``max_pixels`` and up to ``min_pixels``; conversion to RGB (alpha dropped); sides below 28
    raised to 28; aspect ratios over 200 squeezed to 180. RGB and grayscale images go through the
    kernel, bit-identical to Pillow; other modes (alpha, palette, CMYK, 16-bit) take the first
    resizes in Pillow itself, since LLaMA-Factory resizes them before converting."""

    max_pixels: int = 768 * 768
    min_pixels: int = 32 * 32

    def base_steps(self, width: int, height: int) -> list[tuple[int, int]]:
        """The ``image_max_pixels`` / ``image_min_pixels`` resizes, as (width, height)."""
        steps = []
        for bound, over in ((self.max_pixels, True), (self.min_pixels, False)):
            if (width * height > bound) if over else (width * height < bound):
                factor = math.sqrt(bound / (width * height))
                width, height = int(width * factor), int(height * factor)
                steps.append((width, height))
        return steps

    @staticmethod
    def qwen_steps(width: int, height: int) -> list[tuple[int, int]]:
        """Qwen2VLPlugin's fixes after conversion: sides of at least 28, aspect at most 200."""
        steps = []
        if min(width, height) < 28:
            width, height = max(width, 28), max(height, 28)
            steps.append((width, height))
        if width / height > 200:
            width, height = height * 180, height
            steps.append((width, height))
        if height / width > 200:
            width, height = width, width * 180
            steps.append((width, height))
        return steps

    def steps(self, width: int, height: int) -> list[tuple[int, int]]:
        base = self.base_steps(width, height)
        return base + self.qwen_steps(*(base[-1] if base else (width, height)))

    def size(self, header: Header) -> tuple[int, int]:
        steps = self.steps(header.width, header.height)  # stored size: no EXIF orientation
        return steps[-1] if steps else (header.width, header.height)

    @staticmethod
    def _chain(rgb: np.ndarray, steps: list[tuple[int, int]], exact: bool) -> np.ndarray:
        for width, height in steps:
            rgb = resize_rgb(rgb, width, height, exact)
        return rgb

    def resize_array(self, rgb: np.ndarray, exact: bool) -> np.ndarray:
        return self._chain(rgb, self.steps(rgb.shape[1], rgb.shape[0]), exact)

    def rgb(self, data: bytes, header: Header, exact: bool, max_pixels: int | None) -> np.ndarray:
        check_pixels(header, max_pixels)
        if header.format == "jpeg" and _jpeg_colorspace(data) in ("YCbCr", "Gray", "RGB"):
            steps = self.steps(header.width, header.height)  # from the stored size, whatever the decode gives
            cover = steps[0][::-1] if steps and not exact else None  # DCT-scaled decode only when not exact
            rgb = decode(data, target_hw=cover, fast=not exact, max_pixels=max_pixels,
                         header=replace(header, orientation=1), orient=False)
            return self._chain(rgb, steps, exact)
        return self._pillow_rgb(data, exact)

    def _pillow_rgb(self, data: bytes, exact: bool) -> np.ndarray:
        with _open_pillow(data) as im:
            im.load()
            if im.mode in _KERNEL_MODES:
                return self.resize_array(np.asarray(im.convert("RGB")), exact)
            for size in self.base_steps(im.width, im.height):
                im = im.resize(size)  # Pillow's default filter per mode, as LLaMA-Factory calls it
            rgb = np.asarray(im.convert("RGB"))
        return self._chain(rgb, self.qwen_steps(rgb.shape[1], rgb.shape[0]), exact)


@dataclass(frozen=True)
class LlamaFactoryVideos:
    """LLaMA-Factory 0.9.5's video sampling for Qwen2-VL (``_get_video_sample_indices`` and
    ``Qwen2VLPlugin._regularize_videos``) as a :class:`~fastload.video_processor.FrameSampler`.
    It trusts the header: the frame count and duration the container claims, not the packets."""

    fps: float = 2.0
    maxlen: int = 128
    frames: LlamaFactoryImages = LlamaFactoryImages(256 * 256, 16 * 16)

    @staticmethod
    def _seconds(info: VideoInfo) -> float:
        if not info.header_frames or not info.header_seconds:
            raise VideoDecodeError("the video's header gives no frame count or duration, which LLaMA-Factory "
                                   "samples from (it would sample video_maxlen frames or fail)")
        return info.header_seconds

    def indices(self, info: VideoInfo) -> np.ndarray:
        count = max(1, math.floor(self._seconds(info) * self.fps))
        count = min(info.header_frames, self.maxlen, count)
        return np.linspace(0, info.header_frames - 1, count).astype(np.int32)

    def sampled_fps(self, info: VideoInfo, count: int) -> float:
        return count / self._seconds(info)

    def steps(self, width: int, height: int) -> list[tuple[int, int]]:
        return self.frames.steps(width, height)


def _jpeg_colorspace(data: bytes) -> str:
    try:
        return simplejpeg.decode_jpeg_header(data, strict=False)[2]
    except ValueError:
        return "unknown"
