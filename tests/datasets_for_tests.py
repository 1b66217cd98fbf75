"""Datasets the tests hand to workers started with "spawn" or "forkserver": those pickle the
dataset, so its class must be importable by name (``tests.datasets_for_tests``), not defined
inside a test function."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


class Numbers(Dataset):
    """Map-style; draws from torch's RNG so the workers' seeding is compared too."""

    def __init__(self, n: int = 37, delay: float = 0.0):
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        info = get_worker_info()
        return {"i": i, "x": torch.arange(3, dtype=torch.float32) * i, "noise": torch.rand(2),
                "np": np.full(2, i, np.int32), "worker": -1 if info is None else info.id}
