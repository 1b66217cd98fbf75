"""fastload: a high-throughput multimodal DataLoader for fine-tuning Qwen2.5-VL."""
from .decode import DecompressionBombError, ImageDecodeError, image_size
from .shards import ShardDataset, ignore_and_continue, reraise, warn_and_continue
from .vision import Qwen2VLImageProcessor, VisionConfig, expand_patches, num_image_tokens, smart_resize

__all__ = [
    "DecompressionBombError", "ImageDecodeError", "Qwen2VLImageProcessor", "ShardDataset", "VisionConfig",
    "ignore_and_continue", "reraise", "warn_and_continue",
    "expand_patches", "image_size", "num_image_tokens", "smart_resize",
]
