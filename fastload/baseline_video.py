"""transformers' Qwen2.5-VL video path, runnable without torchvision: the reference for tests and benchmarks.

transformers' ``Qwen2VLVideoProcessor`` imports torchvision at module level, and PyPI's
torchvision wheels are CUDA builds that do not load next to a CPU torch. Its frame sampling,
``smart_resize`` and patch layout do not use torchvision, so :func:`transformers_video_functions`
compiles exactly those functions from the installed transformers source (whatever its
version says, nothing copied here). :class:`PilVideoProcessor` is that processor with its one
torchvision step, the resize, done as transformers' PIL image backend does it
(``Qwen2VLImageProcessorPil``: Pillow bicubic, then its rescale and normalize), frame by frame.
:func:`reference_video_processor` puts it into transformers' own ``Qwen2_5_VLProcessor``, which
then expands ``<|video_pad|>`` and computes ``second_per_grid_ts`` itself; where torchvision is
importable, transformers' real video processor is used instead.
"""
from __future__ import annotations

import ast
import functools
import os

import numpy as np
import torch
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin


@functools.lru_cache(maxsize=1)
def transformers_video_functions() -> dict:
    """``smart_resize`` and ``Qwen2VLVideoProcessor``'s ``sample_frames`` and ``patchify``,
    compiled from the installed transformers' source (methods as plain functions of ``self``)."""
    import math

    import transformers.models.qwen2_vl as package
    from transformers.video_utils import VideoMetadata

    path = os.path.join(os.path.dirname(package.__file__), "video_processing_qwen2_vl.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    nodes += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("sample_frames", "patchify")]
    namespace = {"math": math, "torch": torch, "VideoMetadata": VideoMetadata}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return {name: namespace[name] for name in ("smart_resize", "sample_frames", "patchify")}


class _Kwargs(VideosKwargs, total=False):
    """The sampling keywords ``Qwen2VLVideoProcessor`` accepts on top of the common ones."""

    min_frames: int
    max_frames: int


class PilVideoProcessor(VideoProcessorMixin):
    """``Qwen2VLVideoProcessor`` with the PIL backend's resize: same sampling, sizes, layout and
    outputs (``pixel_values_videos``, ``video_grid_thw``, ``video_metadata``)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    valid_kwargs = _Kwargs
    min_frames, max_frames, num_frames, fps = 4, 768, None, None

    def __init__(self, processor_dir, min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        self.frame_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, **kwargs)
        for name in ("patch_size", "temporal_patch_size", "merge_size", "size", "image_mean", "image_std",
                     "rescale_factor"):
            setattr(self, name, getattr(self.frame_processor, name))
        functions = transformers_video_functions()
        self._sample_frames, self._patchify = functions["sample_frames"], functions["patchify"]

    def sample_frames(self, metadata, **kwargs):
        return self._sample_frames(self, metadata, **kwargs)

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        """One (h, w, 3) uint8 frame resized, rescaled and normalized as the PIL backend does."""
        from transformers.image_utils import PILImageResampling, SizeDict

        proc = self.frame_processor
        image = proc.resize(frame.transpose(2, 0, 1), size=proc.size if isinstance(proc.size, SizeDict) else SizeDict(**proc.size), resample=PILImageResampling.BICUBIC,
                            factor=self.patch_size * self.merge_size)
        image = proc.normalize(proc.rescale(image, self.rescale_factor), self.image_mean, self.image_std)
        return np.asarray(image, dtype=np.float32)

    def __call__(self, videos, video_metadata=None, do_sample_frames=None, fps=None, num_frames=None,
                 min_frames=None, max_frames=None, return_tensors=None, **_):
        from transformers.image_processing_utils import BatchFeature

        metadata = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(videos)
        patches, grids = [], []
        for video, meta in zip(videos, metadata):
            if do_sample_frames:
                kwargs = {"fps": fps} if num_frames is None else {"num_frames": num_frames}
                kwargs.update(min_frames=min_frames, max_frames=max_frames)
                meta.frames_indices = self.sample_frames(meta, **kwargs).tolist()
                video = video[meta.frames_indices]
            stacked = torch.from_numpy(np.stack([self._frame(np.asarray(f)) for f in video]))[None]
            flat, t, h, w = self._patchify(self, stacked, self.patch_size, self.merge_size, self.temporal_patch_size)
            patches.append(flat[0])
            grids.append([t, h, w])
        return BatchFeature({"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": list(metadata)})


def reference_video_processor(processor_dir, max_pixels: int | None = None, video_max_pixels: int | None = None):
    """transformers' ``Qwen2_5_VLProcessor`` with a video processor: the real one where
    torchvision loads, else :class:`PilVideoProcessor` (``fastload.baseline.reference_processor``
    builds the rest)."""
    from transformers.utils import is_torchvision_available

    from .baseline import reference_processor

    if is_torchvision_available():  # AutoProcessor's max_pixels would reach its video processor's calls too
        from transformers import AutoImageProcessor, AutoProcessor, AutoVideoProcessor

        proc = AutoProcessor.from_pretrained(processor_dir)
        if max_pixels:
            proc.image_processor = AutoImageProcessor.from_pretrained(processor_dir, max_pixels=max_pixels)
        if video_max_pixels:
            proc.video_processor = AutoVideoProcessor.from_pretrained(processor_dir, max_pixels=video_max_pixels)
        return proc
    proc = reference_processor(processor_dir, max_pixels)
    proc.video_processor = PilVideoProcessor(processor_dir, max_pixels=video_max_pixels)
    return proc
