"""fastload: a high-throughput multimodal DataLoader for fine-tuning Qwen2.5-VL."""
from .decode import DecompressionBombError, ImageDecodeError, image_size
from .vision import Qwen2VLImageProcessor, VisionConfig, expand_patches, num_image_tokens, smart_resize

__all__ = [
    "DecompressionBombError", "ImageDecodeError", "Qwen2VLImageProcessor", "VisionConfig",
    "expand_patches", "image_size", "num_image_tokens", "smart_resize",
]
