"""The path fastload replaces, for benchmarks and ``fastload-bench --compare torch``:
transformers' Qwen2.5-VL processor called in the DataLoader's collate (LLaMA-Factory style).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from .decode import pil_to_rgb
from .text import sample_images, sample_messages


def reference_processor(processor_dir, max_pixels: int | None = None):
    """transformers' ``Qwen2_5_VLProcessor``. transformers 5 builds it through AutoProcessor only
    with torchvision (for its video processor); without torchvision the same class is put
    together around the PIL image processor, which is what transformers itself then uses."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(processor_dir, **kwargs)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(processor_dir)
    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    proc.tokenizer = tok
    proc.image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, **kwargs)
    proc.video_processor = None
    proc.chat_template = tok.chat_template
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    proc.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    return proc


def content_list(text: str) -> list[dict]:
    """``"<image>What?"`` -> transformers' multimodal content list."""
    out = []
    for i, part in enumerate(text.split("<image>")):
        if i:
            out.append({"type": "image"})
        if part:
            out.append({"type": "text", "text": part})
    return out


def pil_decode(data: bytes) -> np.ndarray:
    """How such pipelines decode: Pillow, full size, EXIF transposed, RGB."""
    im = Image.open(io.BytesIO(data))
    return pil_to_rgb(ImageOps.exif_transpose(im))


class TransformersCollate:
    """Collate raw shard samples with transformers' processor (built lazily per process)."""

    def __init__(self, processor_dir, max_pixels: int | None = None):
        self.processor_dir, self.max_pixels = str(processor_dir), max_pixels
        self._proc = None

    def __getstate__(self):
        return {**self.__dict__, "_proc": None}

    def __call__(self, samples: list[dict]) -> dict:
        if self._proc is None:
            self._proc = reference_processor(self.processor_dir, self.max_pixels)
        texts, images = [], []
        for sample in samples:
            messages, system = sample_messages(sample)
            msgs = [{"role": m["role"], "content": content_list(m["content"])} for m in messages]
            if system:
                msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] + msgs
            texts.append(self._proc.apply_chat_template(msgs, tokenize=False))
            images += [pil_decode(b) for b in sample_images(sample)]
        return dict(self._proc(text=texts, images=images or None, padding=True, return_tensors="pt"))

