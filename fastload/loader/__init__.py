"""fastload's DataLoader: workers -> shared memory -> pinned/device prefetch -> trainer."""
from .dataloader import DataLoader

__all__ = ["DataLoader"]
