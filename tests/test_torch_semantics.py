"""Behaviours torch's own test/test_dataloader.py checks, each compared with torch's loader
on the same input (the cases where fastload's loader once differed)."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset
from torch.utils.data.datapipes.iter import IterableWrapper

import fastload

LOADERS = [torch.utils.data.DataLoader, fastload.DataLoader]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class FailsToStart(IterableDataset):
    def __iter__(self):
        raise ValueError("cannot start this stream")


@pytest.mark.parametrize("workers", [0, 2])
def test_error_in_iter_is_the_original_exception(workers):
    for cls in LOADERS:
        with pytest.raises(ValueError, match="cannot start this stream") as exc:
            list(cls(FailsToStart(), num_workers=workers))
        if workers:
            assert "worker process" in str(exc.value)


def test_loader_is_generic_like_torch():
    alias = fastload.DataLoader[list[torch.Tensor]]
    assert alias.__origin__ is fastload.DataLoader


class SlowIndex(Dataset):
    def __init__(self, slow: int):
        self.slow = slow

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == self.slow:
            time.sleep(0.5)
        return i


@pytest.mark.parametrize("keep", [False, True])
def test_out_of_order_delivery_matches_torch(keep):
    """Worker 0 is stuck on item 0 for 0.5 s: the other worker serves everything else first,
    even when the caller keeps every batch (the worker's slots are then all held)."""
    for cls in LOADERS:
        loader = cls(SlowIndex(0), num_workers=2, in_order=False)
        batches = list(loader) if keep else [b.item() for b in loader]
        got = [int(b) for b in batches]
        assert got == [1, 3, 4, 5, 6, 7, 8, 9, 0, 2], cls


def datapipe():
    return IterableWrapper(range(20)).shuffle().sharding_filter()


@pytest.mark.parametrize("persistent", [False, True])
def test_datapipes_are_sharded_and_reseeded_like_torch(persistent):
    runs = []
    for cls in LOADERS:
        loader = cls(datapipe(), batch_size=None, num_workers=2, persistent_workers=persistent,
                     generator=torch.Generator().manual_seed(3))
        runs.append([[int(x) for x in loader] for _ in range(3)])
    torch_epochs, ours = runs
    assert ours == torch_epochs
    assert all(sorted(e) == list(range(20)) for e in ours)  # each item once: sharded per worker
    assert ours[0] != ours[1]  # reshuffled every epoch, persistent workers too


class Unusual(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"nested": torch.nested.nested_tensor([torch.arange(i + 1.0), torch.arange(2.0)]),
                "sparse": torch.eye(3).mul(i).to_sparse(), "dense": torch.tensor(i)}


def keep_list(batch):
    return batch


def test_nested_and_sparse_tensors_travel_like_torch():
    out = [list(cls(Unusual(), batch_size=2, num_workers=2, collate_fn=keep_list)) for cls in LOADERS]
    for a, b in zip(*out):
        for x, y in zip(a, b):
            assert torch.equal(x["sparse"].to_dense(), y["sparse"].to_dense()) and y["sparse"].is_sparse
            assert y["nested"].is_nested
            assert all(torch.equal(p, q) for p, q in zip(x["nested"].unbind(), y["nested"].unbind()))


FD_LIMIT_SCRIPT = """
import resource, sys, torch
import fastload
from torch.utils.data import IterableDataset

class Random(IterableDataset):
    def __iter__(self):
        return (torch.randn(2, 2) for _ in range(200))

loader_cls = {"torch": torch.utils.data.DataLoader, "fastload": fastload.DataLoader}[sys.argv[1]]
keep = []
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
try:
    for t in loader_cls(Random(), multiprocessing_context="fork", num_workers=1):
        keep.append(t)  # every batch kept alive: each holds a descriptor
    print("NO ERROR")
except RuntimeError as e:
    print("ULIMIT" if "ulimit -n" in str(e) and "set_sharing_strategy" in str(e) else repr(e))
"""


def test_running_out_of_descriptors_says_what_to_change():
    import subprocess
    import sys
    for name in ("torch", "fastload"):
        out = subprocess.run([sys.executable, "-c", FD_LIMIT_SCRIPT, name], capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "ULIMIT", (name, out.stdout, out.stderr[-2000:])
