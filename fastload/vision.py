"""The Qwen2.5-VL image pipeline: smart_resize, the processor settings, the fused kernel.

Values, dtype and layout equal transformers' ``Qwen2VLImageProcessor``; the work is one
pass of the C++ kernel (``csrc/``; ``csrc/module.cpp`` lists its files) from the decoder's rows
into the output buffer. Headers come from :mod:`fastload.header` (read once per image), pixels
from :mod:`fastload.decode`, and the uint8 wire format's expansion lives in :mod:`fastload.wire`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from . import _kernels
from .decode import decode, pil_to_rgb
from .header import MAX_IMAGE_PIXELS, Header, parse_image
from .tokenizer import resolve_processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor`` within the pixel bounds, aspect kept.

    Same arithmetic as transformers (Python's banker's ``round`` included), so grids agree.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionConfig:
    """The image processor settings of ``preprocessor_config.json``."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, cfg: dict, **overrides) -> "VisionConfig":
        cfg = dict(cfg)
        size = cfg.pop("size", None) or {}
        cfg.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        cfg.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**cfg, **overrides}.items() if k in names and v is not None}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(float(x) for x in np.broadcast_to(values[key], (3,)))
        return cls(**values)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "VisionConfig":
        """From a processor folder or a hub id in the local cache (see ``resolve_processor``)."""
        with open(os.path.join(resolve_processor(path), "preprocessor_config.json")) as f:
            return cls.from_dict(json.load(f), **overrides)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) for an image of the given size."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(f"with do_resize=False the image ({height}x{width}) must be a "
                                 f"multiple of {self.factor}")
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of the given size."""
        th, tw = self.target_size(height, width)
        return 1, th // self.patch_size, tw // self.patch_size

    def normalization(self) -> np.ndarray:
        """(3, 3) float64, per channel: the rescale factor, mean and std (float32 values) of
        transformers' arithmetic; a disabled step is its identity (1.0; 0.0 and 1.0)."""
        rescale = self.rescale_factor if self.do_rescale else 1.0
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        return np.array([[rescale, np.float32(m), np.float32(s)] for m, s in zip(mean, std)], np.float64)

    def lut(self, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """(3, 256) table of normalized values, computed with transformers' exact float ops: the
        rescale in float64 rounded to float32, then (x - mean) / std in float32. The kernel
        computes the same operations in vectors where they reproduce this table."""
        norm = self.normalization()
        x = (np.arange(256, dtype=np.float64)[None, :] * norm[:, :1]).astype(np.float32)
        table = (x - norm[:, 1:2].astype(np.float32)) / norm[:, 2:3].astype(np.float32)
        table = np.ascontiguousarray(table, dtype=np.float32)
        if dtype == torch.bfloat16:
            return torch.from_numpy(table).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        if dtype != torch.float32:
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        return table


def num_image_tokens(width: int, height: int, config: VisionConfig | dict | None = None) -> int:
    """Number of ``<|image_pad|>`` tokens Qwen2.5-VL gives an image of this size."""
    if not isinstance(config, VisionConfig):
        config = VisionConfig.from_dict(config or {})
    t, h, w = config.grid(height, width)
    return t * h * w // config.merge_size ** 2


class PreResize(Protocol):
    """Resizes a pipeline applies before the processor's ``smart_resize``, each one Pillow's
    bicubic (LLaMA-Factory's ``image_max_pixels``: see :mod:`fastload.llamafactory`). The
    kernel reproduces Pillow's resize bit for bit, so the chain runs there on the decoded
    pixels: no re-encoding, and the grid is still known from the header alone."""

    def size(self, header: Header) -> tuple[int, int]:
        """(width, height) the processor receives for an image with this header."""

    def rgb(self, data: bytes, header: Header, exact: bool, max_pixels: int | None) -> np.ndarray:
        """Decoded pixels, resized as the pipeline does (through :func:`resize_rgb`)."""

    def resize_array(self, rgb: np.ndarray, exact: bool) -> np.ndarray:
        """The same resizes for an already decoded RGB array."""


def resize_rgb(rgb: np.ndarray, width: int, height: int, exact: bool = True) -> np.ndarray:
    """uint8 RGB resized with Pillow's bicubic (bit-identical with ``exact``) by the kernel."""
    out = fresh_array((height, width, 3), np.uint8)
    _kernels.resize(np.ascontiguousarray(rgb), out, height, width, exact)
    return out


def _to_rgb_array(image, config: VisionConfig, fast: bool,
                  max_pixels: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decoded RGB pixels and the resize target (height, width) of the *original* image
    (bytes, a path, a :class:`~fastload.header.ParsedImage` whose header is reused, a PIL image
    or a uint8 array).

    With ``fast``, a JPEG may decode DCT-scaled and with libjpeg-turbo's fast IDCT and
    upsampling; the target still comes from its full size (read from the header), so the
    grid never depends on the decode path.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError("arrays must be uint8 (H, W) or (H, W, C)")
        if image.ndim == 2 or image.shape[2] != 3:
            image = pil_to_rgb(Image.fromarray(image.squeeze()))
        return np.ascontiguousarray(image), config.target_size(image.shape[0], image.shape[1])
    if isinstance(image, Image.Image):
        rgb = pil_to_rgb(image)
        return rgb, config.target_size(rgb.shape[0], rgb.shape[1])
    parsed = parse_image(image, max_pixels)  # as it is when the caller parsed it already
    width, height = parsed.header.size
    target = config.target_size(height, width)
    rgb = decode(parsed, target_hw=target if fast else None, fast=fast, max_pixels=max_pixels)
    return np.ascontiguousarray(rgb), target  # EXIF rotations arrive as views


def fresh_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array for an output, from the kernel's block pool: repeated large
    outputs reuse the largest freed block instead of faulting in new pages (csrc/pool.cpp)."""
    count = math.prod(shape)
    block = _kernels.empty(count * np.dtype(dtype).itemsize)
    return np.frombuffer(block, dtype, count).reshape(shape)


class Qwen2VLImageProcessor:
    """Drop-in for transformers' ``Qwen2VLImageProcessor``, fused and GIL-free.

    ``exact=True`` always decodes full size and resizes exactly as Pillow does, so its values
    equal transformers' PIL backend bit for bit given the same image (for bytes or a path with
    alpha, transformers' ``load_image`` drops the alpha where fastload composites it onto white,
    as transformers does for an opened image: README, "The image processor on its own").
    ``exact=False`` trades that for speed where it
    is cheap: JPEGs decode DCT-scaled when that still covers the target size, with
    libjpeg-turbo's fast IDCT and chroma upsampling, and the resize takes the cheaper pass
    order with 8-bit weights (16-bit where it shrinks over 2x; PSNR ~38.4 dB against exact
    on real photos, nearly all of it from the decode).
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, config: VisionConfig | None = None, *, exact: bool = False,
                 dtype: torch.dtype = torch.float32, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 pre_resize: PreResize | None = None, **overrides):
        config = config or VisionConfig()
        self.config = replace(config, **overrides) if overrides else config
        self.exact = exact
        self.pre_resize = pre_resize
        self.dtype = dtype
        self.max_image_pixels = max_image_pixels
        self._lut = self.config.lut(dtype)
        self._norm = self.config.normalization()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "Qwen2VLImageProcessor":
        names = {f.name for f in fields(VisionConfig)} | {"size"}
        config_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if "size" in config_kw:
            size = config_kw.pop("size")
            config_kw.setdefault("min_pixels", size.get("shortest_edge"))
            config_kw.setdefault("max_pixels", size.get("longest_edge"))
        return cls(VisionConfig.from_pretrained(path, **config_kw), **kwargs)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_lut", "_norm")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lut = self.config.lut(self.dtype)
        self._norm = self.config.normalization()

    # -- pixels ---------------------------------------------------------------
    def rgb(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """Decoded RGB of one image (approximate and DCT-scaled unless ``exact``) and its resize
        target; with ``pre_resize``, the pixels are already pre-resized. A
        :class:`~fastload.header.ParsedImage` (what ``Qwen2VLTransform`` passes) is not parsed again."""
        if self.pre_resize is None:
            return _to_rgb_array(image, self.config, not self.exact, self.max_image_pixels)
        if isinstance(image, (np.ndarray, Image.Image)):
            rgb, _ = _to_rgb_array(image, self.config, False, None)
            rgb = self.pre_resize.resize_array(rgb, self.exact)
        else:
            parsed = parse_image(image, self.max_image_pixels)
            rgb = self.pre_resize.rgb(parsed.data, parsed.header, self.exact, self.max_image_pixels)
        return np.ascontiguousarray(rgb), self.config.target_size(rgb.shape[0], rgb.shape[1])

    def input_size(self, header: Header) -> tuple[int, int]:
        """(width, height) of the image ``smart_resize`` sees, from its header alone."""
        return self.pre_resize.size(header) if self.pre_resize else header.size

    def num_tokens(self, header: Header) -> int:
        """``<|image_pad|>`` tokens of an image, from its header alone."""
        return num_image_tokens(*self.input_size(header), self.config)

    def _grid(self, target: tuple[int, int]) -> tuple[int, int, int]:
        return 1, target[0] // self.config.patch_size, target[1] // self.config.patch_size

    def resized(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The uint8 wire format: the resized (h, w, 3) image and its grid (t, h, w)."""
        rgb, (th, tw) = self.rgb(image)
        return resize_rgb(rgb, tw, th, self.exact), self._grid((th, tw))

    def process_into(self, rgb: np.ndarray, target: tuple[int, int], out: np.ndarray) -> None:
        """Runs the fused kernel: decoded pixels -> patches of the ``target`` size, into ``out``."""
        cfg = self.config
        _kernels.process(rgb, out, self._lut, self._norm, target[0], target[1], cfg.patch_size,
                         cfg.temporal_patch_size, cfg.merge_size, self.exact)

    def prepare(self, images) -> "PendingPatches":
        """Decodes one image or a list and returns their patches still to be written: the
        loader has the kernel write them straight into shared memory (see PendingPatches)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return PendingPatches(self, [self.rgb(im) for im in images])

    def __call__(self, images, return_tensors: str | None = "pt", out: torch.Tensor | np.ndarray | None = None):
        """``{"pixel_values", "image_grid_thw"}`` for one image or a list, as transformers returns them."""
        pending = self.prepare(images)
        flat = self._output_buffer(out, pending.shape[0])
        pending.write_into(flat)
        pixel_values = self._wrap(flat, out, return_tensors)
        if return_tensors == "pt":
            return {"pixel_values": pixel_values, "image_grid_thw": pending.grid_thw}
        return {"pixel_values": pixel_values, "image_grid_thw": pending.grid_thw.numpy()}

    def _output_buffer(self, out, rows: int) -> np.ndarray:
        shape = (rows, self.config.patch_dim)
        if out is None:
            return fresh_array(shape, self._lut.dtype)
        if isinstance(out, torch.Tensor):
            if tuple(out.shape) != shape or out.dtype != self.dtype or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {shape}")
            out = out.view(torch.int16).numpy().view(np.uint16) if self.dtype == torch.bfloat16 else out.numpy()
        if out.shape != shape or out.dtype != self._lut.dtype:
            raise ValueError(f"out must be {self._lut.dtype} of shape {shape}")
        return out

    def _wrap(self, flat: np.ndarray, out, return_tensors):
        if isinstance(out, torch.Tensor):
            return out
        if return_tensors == "pt":
            tensor = torch.from_numpy(flat)
            return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor
        if self.dtype == torch.bfloat16:
            raise ValueError("bfloat16 output needs return_tensors='pt' (numpy has no bfloat16)")
        return flat


class PendingPatches:
    """Decoded images whose patches are not written yet, with the shape, dtype and byte size
    they will have: a write request (:mod:`fastload.deferred`). ``write_into`` runs the kernel
    into any buffer of that shape — in a fastload worker, the batch's shared-memory segment —
    so float32 patches (24 bytes per pixel) are written once instead of being written,
    concatenated and copied."""

    def __init__(self, processor: Qwen2VLImageProcessor, decoded: list[tuple[np.ndarray, tuple[int, int]]]):
        self.processor, self.decoded = processor, decoded
        grids = [processor._grid(target) for _, target in decoded]
        self.grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        self.shape = (sum(h * w for _, h, w in grids), processor.config.patch_dim)
        self.dtype = processor.dtype
        self.nbytes = self.shape[0] * self.shape[1] * processor._lut.itemsize

    def write_into(self, out: torch.Tensor | np.ndarray) -> None:
        flat = self.processor._output_buffer(out, self.shape[0])
        row = 0
        for (rgb, target), (_, h, w) in zip(self.decoded, self.grid_thw.tolist()):
            self.processor.process_into(rgb, target, flat[row:row + h * w])
            row += h * w

    def tensor(self) -> torch.Tensor:
        flat = self.processor._output_buffer(None, self.shape[0])
        self.write_into(flat)
        return self.processor._wrap(flat, None, "pt")
