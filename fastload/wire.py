"""The uint8 wire format: resized images instead of float patches, expanded where they land.

``Qwen2VLTransform(dtype=torch.uint8)`` sends each image as its resized (h, w, 3) uint8
pixels (``Qwen2VLImageProcessor.resized``), flattened and concatenated per sample as
``image_pixels``, with its ``image_grid_thw``: 3 bytes per pixel instead of the 24 of float32
patches (each pixel is repeated over the temporal patch). :func:`expand_patches` turns them
into ``pixel_values`` on whatever device they reach, typically the GPU after the copy.
"""
from __future__ import annotations

import torch

from .vision import VisionConfig


def expand_patches(pixels: torch.Tensor, image_grid_thw: torch.Tensor, config: VisionConfig | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turns the uint8 wire format into ``pixel_values``, on whatever device ``pixels`` is.

    ``pixels`` is the concatenation of each image's flattened resized (h, w, 3) uint8 array;
    the result equals the fused kernel's output bit for bit (same lookup table).
    """
    cfg = config or VisionConfig()
    lut = torch.from_numpy(cfg.lut(torch.float32)).to(pixels.device)
    P, M, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    chunks, offset = [], 0
    for _, gh, gw in image_grid_thw.tolist():
        h, w = gh * P, gw * P
        img = pixels[offset:offset + h * w * 3].view(h, w, 3).permute(2, 0, 1).long()
        offset += h * w * 3
        values = torch.gather(lut, 1, img.reshape(3, -1)).view(3, gh // M, M, P, gw // M, M, P)
        patches = values.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5).expand(-1, -1, -1, -1, -1, T, -1, -1)
        chunks.append(patches.reshape(gh * gw, 3 * T * P * P))
    return torch.cat(chunks).to(dtype) if chunks else pixels.new_empty((0, 3 * T * P * P), dtype=dtype)
