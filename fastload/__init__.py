"""fastload: a high-throughput multimodal DataLoader for fine-tuning Qwen2.5-VL."""
from .collate import Qwen2VLCollator
from .loader import DataLoader
from .decode import DecompressionBombError, ImageDecodeError, image_size
from .errors import Skip
from .loader.resume import ResumeError
from .shards import ShardDataset
from .text import Qwen2VLTransform, SampleError
from .vision import Qwen2VLImageProcessor, VisionConfig, expand_patches, num_image_tokens, smart_resize

__all__ = [
    "DataLoader", "DecompressionBombError", "ImageDecodeError", "Qwen2VLCollator", "Qwen2VLImageProcessor",
    "Qwen2VLTransform", "ResumeError", "SampleError", "ShardDataset", "Skip", "VisionConfig",
    "expand_patches", "image_size", "num_image_tokens", "smart_resize",
]
