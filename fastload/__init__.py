"""fastload: a high-throughput multimodal DataLoader for fine-tuning Qwen2.5-VL."""
from .budget import SampleTooLong, TokenBatchSampler, TokenBudget
from .collate import Qwen2VLCollator
from .errors import Skip
from .header import DecompressionBombError, ImageDecodeError, image_size
from .loader import DataLoader
from .loader.resume import ResumeError
from .mrope import Qwen2VLRopeCollator, rope_index
from .packing import Qwen2VLPackingCollator
from .shards import ShardDataset
from .text import Qwen2VLTransform, SampleError
from .video import VideoDecodeError
from .video_processor import Qwen2VLVideoProcessor, VideoConfig
from .vision import Qwen2VLImageProcessor, VisionConfig, num_image_tokens, smart_resize
from .wire import expand_patches

__all__ = [
    "DataLoader", "DecompressionBombError", "ImageDecodeError", "Qwen2VLCollator", "Qwen2VLImageProcessor",
    "Qwen2VLPackingCollator", "Qwen2VLRopeCollator", "Qwen2VLTransform", "ResumeError", "SampleError",
    "SampleTooLong", "ShardDataset", "Skip", "TokenBatchSampler", "TokenBudget", "VisionConfig",
    "expand_patches", "image_size", "num_image_tokens", "rope_index", "smart_resize",
    "Qwen2VLVideoProcessor", "VideoConfig", "VideoDecodeError",
]
