"""The Qwen2.5-VL video pipeline: frame sampling, smart_resize, temporal patches, from metadata first.

Equal to transformers' ``Qwen2VLVideoProcessor`` (and ``Qwen2_5_VLProcessor``'s
``second_per_grid_ts``) given the same frames and metadata:

- **Sampling** (``sample_frames``): with ``fps``, ``frames / video_fps * fps`` frames clamped to
  ``[min_frames, min(max_frames, frames)]`` and floored to a multiple of ``temporal_patch_size``;
  indices ``torch.arange(0, frames, frames / n).int()``, the reference's float32 arithmetic
  included (it decides which frame a fractional step lands on).
- **Size**: ``smart_resize`` with the video's pixel budget (``cap_pixels_per_frame`` as
  transformers computes it), then Pillow's bicubic in the kernel (bit-identical with ``exact``).
- **Patches**: frames ``2g`` and ``2g + 1`` form temporal patch ``g`` (an odd count repeats the
  last frame, as transformers pads); ``second_per_grid_ts = temporal_patch_size / sampled_fps``.

Everything but the pixels comes from :func:`fastload.video.probe` (packets, one decoded for
the display rotation): the grid, the token count, and the output's byte size, which is checked
against :data:`MAX_VIDEO_BYTES` before the sampled frames are decoded. The frames are decoded by
:func:`fastload.video.decode_frames`, each resized to the target right away (only small uint8
frames are held), and the fused kernel writes the patches once, straight into the batch's
shared memory in a fastload worker (see :class:`PendingVideoPatches`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import numpy as np
import torch

from .header import MAX_IMAGE_PIXELS, _env_bytes, as_bytes
from .tokenizer import resolve_processor
from .video import VideoDecodeError, VideoInfo, decode_frames, probe, rgb24
from .vision import (
    Qwen2VLImageProcessor,
    VisionConfig,
    fresh_array,
    resize_rgb,
    smart_resize,
)

#: Refuse a video whose ``pixel_values_videos`` plus resized frames would take more bytes than
#: this, before decoding it (``FASTLOAD_MAX_VIDEO_BYTES`` in the environment: bytes, ``0`` for
#: no limit). 2 GiB is 768 frames of 448x448 in float32 with room to spare.
MAX_VIDEO_BYTES = _env_bytes("FASTLOAD_MAX_VIDEO_BYTES", 2 << 30)

_CONFIG_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


class FrameSampler(Protocol):
    """Another library's frame sampling and frame pre-resize, replacing transformers' (the
    LLaMA-Factory preset's :class:`~fastload.llamafactory.LlamaFactoryVideos`)."""

    def indices(self, info: VideoInfo) -> np.ndarray:
        """The frames to sample, from the container's metadata."""

    def sampled_fps(self, info: VideoInfo, count: int) -> float:
        """The frame rate ``second_per_grid_ts`` is computed from, for ``count`` sampled frames."""

    def steps(self, width: int, height: int) -> list[tuple[int, int]]:
        """The (width, height) resizes each frame takes before ``smart_resize``'s."""


@dataclass(frozen=True)
class VideoConfig:
    """The video processor's settings: ``vision`` holds the patch layout, normalization and the
    per-frame pixel budget (``min_pixels``/``max_pixels``: transformers' ``size``); the rest is
    frame sampling. ``fps=None`` with ``num_frames=None`` keeps every frame. Frames are shown
    upright as their display rotation says (transformers' default loader, torchcodec >= 0.11,
    does so; its PyAV loader does not). A ``sampler`` replaces transformers' sampling (and may
    pre-resize the frames); the libraries samplers follow apply no rotation, so none is applied."""

    vision: VisionConfig = field(  # transformers' class defaults, for a folder without a config
        default_factory=lambda: VisionConfig(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28))
    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    sampler: FrameSampler | None = None

    @classmethod
    def from_dict(cls, cfg: dict, **overrides) -> VideoConfig:
        """From a video processor's config dict; ``overrides`` may name any field or a
        :class:`VisionConfig` field (``max_pixels``, ``min_pixels``, ...). Asking for
        ``num_frames`` turns ``fps`` off (the reference takes one or the other)."""
        merged = {**cfg, **overrides}
        if merged.get("num_frames") is not None and "fps" not in overrides:
            merged["fps"] = None
        names = {f.name for f in fields(cls)} - {"vision"}
        own = {k: v for k, v in merged.items() if k in names}
        return cls(vision=VisionConfig.from_dict({k: v for k, v in merged.items() if k not in names}), **own)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> VideoConfig:
        """The video processor config transformers loads from a processor folder: the
        ``video_processor`` entry of ``processor_config.json``, else
        ``video_preprocessor_config.json``, else ``preprocessor_config.json`` (Qwen2.5-VL's
        checkpoints ship only that one, so videos share the images' pixel budget). The frame
        rate defaults to 2.0 (qwen-vl-utils' and LLaMA-Factory's), where transformers samples
        only when asked to (``fps=2.0`` gives the same frames)."""
        folder = resolve_processor(path)
        cfg = _nested_video_config(folder)
        for name in _CONFIG_FILES:
            if cfg is None and os.path.exists(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    cfg = json.load(f)
        return cls.from_dict(cfg or {}, **overrides)

    @property
    def temporal_patch_size(self) -> int:
        return self.vision.temporal_patch_size

    def frame_indices(self, frames: int, video_fps: float) -> np.ndarray:
        """Indices of the frames to sample, as ``Qwen2VLVideoProcessor.sample_frames`` picks them."""
        tps = self.temporal_patch_size
        if self.num_frames is not None:
            count = round(self.num_frames / tps) * tps
        elif self.fps is not None:
            max_frames = math.floor(min(self.max_frames, frames) / tps) * tps
            count = frames / video_fps * self.fps
            count = min(max(count, self.min_frames), max_frames, frames)
            count = math.floor(count / tps) * tps
        else:
            return np.arange(frames)
        if count > frames:
            raise VideoDecodeError(f"{count} frames asked of a video of {frames}")
        if count < 1:
            raise VideoDecodeError(f"a video of {frames} frame(s) is too short: Qwen2.5-VL takes frames "
                                   f"{tps} at a time")
        return torch.arange(0, frames, frames / count).int().numpy()

    def frame_size(self, height: int, width: int, sampled: int) -> tuple[int, int]:
        """(height, width) every sampled frame is resized to."""
        vision = self.vision
        max_pixels = vision.max_pixels
        if self.cap_pixels_per_frame:  # transformers' share of the whole video's budget
            total = int(self.max_video_tokens * vision.factor * vision.factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // sampled),
                             int(vision.min_pixels * 1.05))
        if not vision.do_resize:
            return vision.target_size(height, width)
        return smart_resize(height, width, vision.factor, vision.min_pixels, max_pixels)

    def plan(self, info: VideoInfo) -> VideoPlan:
        """What the video becomes, from its metadata alone."""
        if self.sampler is None:
            indices, steps, turns = self.frame_indices(info.frames, info.fps), [], info.rotation // 90
            sampled_fps = len(indices) / info.frames * info.fps  # VideoMetadata.sampled_fps
            width, height = info.display_size
        else:  # the samplers follow libraries that show the stored frames, unrotated
            indices, steps, turns = self.sampler.indices(info), self.sampler.steps(info.width, info.height), 0
            sampled_fps = self.sampler.sampled_fps(info, len(indices))
            width, height = steps[-1] if steps else (info.width, info.height)
        target = self.frame_size(height, width, len(indices))
        tps, patch = self.temporal_patch_size, self.vision.patch_size
        grid = (-(-len(indices) // tps), target[0] // patch, target[1] // patch)
        return VideoPlan(tuple(int(i) for i in indices), target, grid, tps / sampled_fps, tuple(steps), turns)


def _nested_video_config(folder: str) -> dict | None:
    path = os.path.join(folder, "processor_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("video_processor")


@dataclass(frozen=True)
class VideoPlan:
    """A video's sampled frame indices, resize target (h, w), grid (t, h, w), seconds per
    temporal patch (``second_per_grid_ts``), the (width, height) resizes a frame takes
    before the one to ``target`` (a sampler's pre-resize), and the counter-clockwise quarter
    turns that show a decoded frame upright (its display rotation), made before any resize."""

    indices: tuple[int, ...]
    target: tuple[int, int]
    grid: tuple[int, int, int]
    second_per_grid_t: float
    steps: tuple[tuple[int, int], ...] = ()
    quarter_turns: int = 0

    @property
    def patches(self) -> int:
        return math.prod(self.grid)

    def num_tokens(self, merge_size: int) -> int:
        return self.patches // merge_size ** 2


class Qwen2VLVideoProcessor:
    """transformers' ``Qwen2VLVideoProcessor`` over the fused kernel, decoding in the caller's
    process (a loader worker) only the frames it samples.

    ``exact=True`` resizes each frame exactly as Pillow's bicubic does (transformers' PIL
    image path, frame by frame); the default resizes with the kernel's 8-bit weights (PSNR
    58-62 dB against exact on 720p frames). ``threads`` is FFmpeg's decoder thread count.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]

    def __init__(self, config: VideoConfig | None = None, *, exact: bool = False,
                 dtype: torch.dtype = torch.float32, threads: int = 1,
                 max_video_bytes: int | None = MAX_VIDEO_BYTES, max_frame_pixels: int | None = MAX_IMAGE_PIXELS,
                 timeout: float | None = None):
        self.config = config or VideoConfig()
        self.exact, self.dtype, self.threads, self.timeout = exact, dtype, threads, timeout
        self.max_video_bytes, self.max_frame_pixels = max_video_bytes, max_frame_pixels
        # Frames arrive resized: one frame per temporal slot, each written without duplication.
        self._frames = Qwen2VLImageProcessor(replace(self.config.vision, temporal_patch_size=1), exact=True,
                                             dtype=dtype, max_image_pixels=None)

    @classmethod
    def from_pretrained(cls, path, *, exact: bool = False, dtype: torch.dtype = torch.float32,
                        **overrides) -> Qwen2VLVideoProcessor:
        return cls(VideoConfig.from_pretrained(path, **overrides), exact=exact, dtype=dtype)

    @property
    def merge_size(self) -> int:
        return self.config.vision.merge_size

    # -- metadata only --------------------------------------------------------------------
    def plan(self, info: VideoInfo) -> VideoPlan:
        """The video's plan, refused here (before any decoding) when a frame is over the pixel
        limit or the output over the byte budget."""
        if self.max_frame_pixels and info.width * info.height > self.max_frame_pixels:
            raise VideoDecodeError(f"video frames of {info.width}x{info.height} are over the "
                                   f"{self.max_frame_pixels}-pixel limit")
        plan = self.config.plan(info)
        need = self.nbytes(plan) + len(plan.indices) * plan.target[0] * plan.target[1] * 3
        if self.max_video_bytes and need > self.max_video_bytes:
            raise VideoDecodeError(f"video of {info.frames} frames at {info.width}x{info.height} needs "
                                   f"{need / 2**30:.1f} GiB as {len(plan.indices)} frames of {plan.target}, over "
                                   f"the {self.max_video_bytes / 2**30:.1f} GiB budget (FASTLOAD_MAX_VIDEO_BYTES; "
                                   "or lower fps, max_frames or max_pixels)")
        return plan

    def num_tokens(self, info: VideoInfo) -> int:
        """``<|video_pad|>`` tokens of a video, from its metadata alone."""
        return self.plan(info).num_tokens(self.merge_size)

    def nbytes(self, plan: VideoPlan) -> int:
        return plan.patches * self.config.vision.patch_dim * self._frames._lut.itemsize

    # -- pixels ---------------------------------------------------------------------------
    def frames(self, data: bytes, info: VideoInfo | None = None) -> tuple[list[np.ndarray], VideoPlan]:
        """The sampled frames, decoded and resized to the plan's target (uint8 (h, w, 3))."""
        data = as_bytes(data)
        info = info or probe(data)
        plan = self.plan(info)
        th, tw = plan.target

        def resized(frame) -> np.ndarray:
            rgb = rgb24(frame)
            if rgb.shape[:2] != (info.height, info.width):
                raise VideoDecodeError(f"a frame of {rgb.shape[1]}x{rgb.shape[0]} in a video of "
                                       f"{info.width}x{info.height} (the size changes mid-stream)")
            if plan.quarter_turns:
                rgb = np.rot90(rgb, plan.quarter_turns)
            for width, height in plan.steps:
                rgb = resize_rgb(rgb, width, height, self.exact)
            return resize_rgb(rgb, tw, th, self.exact)

        frames = decode_frames(data, info, plan.indices, resized, threads=self.threads, timeout=self.timeout)
        return frames, plan

    def prepare(self, videos) -> PendingVideoPatches:
        """Decodes one video or a list (bytes or paths) and returns their patches still to be written."""
        if not isinstance(videos, (list, tuple)):
            videos = [videos]
        return PendingVideoPatches(self, [self.frames(v) for v in videos])

    def write_patches(self, frames: list[np.ndarray], plan: VideoPlan, out: np.ndarray) -> None:
        """One video's patches into ``out`` ((patches, patch_dim)): frame ``g*T + t`` fills
        temporal slot ``t`` of patch group ``g`` (the last frame repeated to fill the last)."""
        tps = self.config.temporal_patch_size
        _, gh, gw = plan.grid
        rows, plane = gh * gw, self.config.vision.patch_size ** 2
        scratch = np.empty((rows, 3 * plane), out.dtype)
        for g in range(plan.grid[0]):
            block = out[g * rows:(g + 1) * rows].reshape(rows, 3, tps, plane)
            for t in range(tps):
                self._frames.process_into(frames[min(g * tps + t, len(frames) - 1)], plan.target, scratch)
                block[:, :, t, :] = scratch.reshape(rows, 3, plane)

    def __call__(self, videos, return_tensors: str | None = "pt") -> dict:
        """``{"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}`` for one video or a list."""
        pending = self.prepare(videos)
        out = {"pixel_values_videos": pending.tensor(), "video_grid_thw": pending.grid_thw,
               "second_per_grid_ts": pending.second_per_grid_ts}
        if return_tensors != "pt":
            out = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in out.items()}
        return out


class PendingVideoPatches:
    """Decoded, resized frames of one or more videos whose patches are not written yet; like
    :class:`~fastload.vision.PendingPatches`, a write request (:mod:`fastload.deferred`):
    ``write_into`` runs the kernel into any buffer of ``shape``, e.g. the batch's shared memory."""

    def __init__(self, processor: Qwen2VLVideoProcessor, videos: list[tuple[list[np.ndarray], VideoPlan]]):
        self.processor, self.videos = processor, videos
        plans = [plan for _, plan in videos]
        self.grid_thw = torch.tensor([p.grid for p in plans], dtype=torch.long).reshape(-1, 3)
        self.second_per_grid_ts = torch.tensor([p.second_per_grid_t for p in plans], dtype=torch.float32)
        self.shape = (sum(p.patches for p in plans), processor.config.vision.patch_dim)
        self.dtype = processor.dtype
        self.nbytes = sum(processor.nbytes(p) for p in plans)

    def _array(self, out: torch.Tensor | np.ndarray) -> np.ndarray:
        """``out`` as a numpy array of the patches' shape and item type (bfloat16 as uint16)."""
        if isinstance(out, torch.Tensor):
            if tuple(out.shape) != self.shape or out.dtype != self.dtype or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {self.shape}")
            out = out.view(torch.int16).numpy().view(np.uint16) if self.dtype == torch.bfloat16 else out.numpy()
        lut = self.processor._frames._lut
        if out.shape != self.shape or out.dtype != lut.dtype:
            raise ValueError(f"out must be {lut.dtype} of shape {self.shape}")
        return out

    def write_into(self, out: torch.Tensor | np.ndarray) -> None:
        flat, row = self._array(out), 0
        for frames, plan in self.videos:
            self.processor.write_patches(frames, plan, flat[row:row + plan.patches])
            row += plan.patches

    def tensor(self) -> torch.Tensor:
        frames = self.processor._frames
        flat = fresh_array(self.shape, frames._lut.dtype)
        self.write_into(flat)
        return frames._wrap(flat, None, "pt")


def make_video_processor(processor_dir, video: VideoConfig | dict | None = None, *, exact: bool = False,
                         dtype: torch.dtype = torch.float32) -> Qwen2VLVideoProcessor:
    """The video processor of a processor folder: ``video`` is a :class:`VideoConfig`, or a dict
    of overrides of the folder's config (``fps``, ``max_pixels``, ``max_frames``, ...)."""
    config = video if isinstance(video, VideoConfig) else VideoConfig.from_pretrained(processor_dir, **(video or {}))
    return Qwen2VLVideoProcessor(config, exact=exact, dtype=dtype)


def video_inputs(processor: Qwen2VLVideoProcessor, videos: list[tuple[bytes, VideoInfo]]) -> dict:
    """A sample's video keys for already probed videos, ``pixel_values_videos`` as a write
    request (:class:`PendingVideoPatches`; see :mod:`fastload.deferred`)."""
    if not videos:
        return {}
    pending = PendingVideoPatches(processor, [processor.frames(data, info) for data, info in videos])
    return {"pixel_values_videos": pending, "video_grid_thw": pending.grid_thw,
            "second_per_grid_ts": pending.second_per_grid_ts}
