"""Write requests (fastload.deferred): the one path pixels take from a shard to the trainer.

The transform can leave pixels unwritten, a collator's ``collate_deferred`` concatenates them
as requests, and fastload's loader has the kernel write them into the batch's shared memory.
These tests pin down that each step is asked for explicitly, that every other collate function
still receives tensors, and that the result equals torch's DataLoader doing the same work.
"""
from __future__ import annotations

import ast
import json
import pathlib
import random

import pytest
import torch

import fastload
from fastload.deferred import Concat, defers, is_request, materialize
from fastload.loader.fetch import Fetcher
from fastload.vision import PendingPatches
from fastload.writer import ShardWriter

from .conftest import jpeg_bytes, photo_like

PACKAGE = pathlib.Path(fastload.__file__).parent


def write_shards(tmp_path, n: int = 6) -> str:
    rng = random.Random(3)
    writer = ShardWriter(str(tmp_path / "px"), maxcount=4)
    for i in range(n):
        k = 1 + i % 3
        members = {f"{j}.jpg": jpeg_bytes(photo_like(rng.randrange(40, 120), rng.randrange(40, 120), i * 3 + j))
                   for j in range(k)}
        meta = {"messages": [{"role": "user", "content": "<image>" * k + f"Picture {i}?"},
                             {"role": "assistant", "content": "A photo."}]}
        writer.write(f"{i:04d}", {"json": json.dumps(meta).encode(), **members})
    shards = writer.close({})
    return str(tmp_path / f"px-{{000000..{len(shards) - 1:06d}}}.tar")


@pytest.fixture
def transform(processor_dir):
    return fastload.Qwen2VLTransform(processor_dir, max_pixels=120 * 120)


def test_deferred_sample_is_a_request_that_equals_the_tensor(transform, tmp_path):
    raw = next(iter(fastload.ShardDataset(write_shards(tmp_path))))
    plain, deferred = transform(raw), transform.deferred(raw)
    assert isinstance(plain["pixel_values"], torch.Tensor)
    assert isinstance(deferred["pixel_values"], PendingPatches) and is_request(deferred["pixel_values"])
    assert torch.equal(deferred["pixel_values"].tensor(), plain["pixel_values"])
    assert torch.equal(materialize(deferred)["pixel_values"], plain["pixel_values"])
    assert all(torch.equal(deferred[k], plain[k]) for k in ("input_ids", "labels", "image_grid_thw"))


def test_collators_return_tensors_and_offer_requests(transform, tmp_path):
    examples = [transform.deferred(s) for s in fastload.ShardDataset(write_shards(tmp_path))][:3]
    for collate in (fastload.Qwen2VLCollator(), fastload.Qwen2VLPackingCollator(), fastload.Qwen2VLRopeCollator()):
        assert defers(collate)
        requests = collate.collate_deferred(examples)
        assert isinstance(requests["pixel_values"], Concat)
        assert all(isinstance(p, PendingPatches) for p in requests["pixel_values"].parts)
        assert isinstance(requests["image_grid_thw"], torch.Tensor)
        tensors = collate(examples)
        assert isinstance(tensors["pixel_values"], torch.Tensor)
        expected = torch.cat([e["pixel_values"].tensor() for e in examples])
        assert torch.equal(tensors["pixel_values"], expected)
        assert torch.equal(requests["pixel_values"].tensor(), expected)


def test_fetcher_asks_for_requests_only_when_writing_into_its_buffer(transform, tmp_path):
    dataset = fastload.ShardDataset(write_shards(tmp_path), transform=transform)
    collate = fastload.Qwen2VLCollator()
    for into_buffer, leaf in ((True, Concat), (False, torch.Tensor)):
        fetcher = Fetcher(dataset, True, True, collate, False, into_buffer=into_buffer)
        fetcher.start()
        assert isinstance(fetcher.fetch([None, None])["pixel_values"], leaf)
    # a collate function without collate_deferred gets tensors even where the loader writes
    seen = []
    fetcher = Fetcher(dataset, True, True, lambda b: seen.extend(b) or {}, False, into_buffer=True)
    fetcher.start()
    fetcher.fetch([None, None])
    assert seen and all(isinstance(s["pixel_values"], torch.Tensor) for s in seen)


def _cat_collate(samples: list[dict]) -> dict:
    """A user's own collate function: it needs real tensors."""
    return {"pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "ids": torch.cat([s["input_ids"] for s in samples])}


@pytest.mark.parametrize("collate", [fastload.Qwen2VLCollator(), fastload.Qwen2VLPackingCollator(), _cat_collate],
                         ids=["padded", "packed", "custom"])
def test_worker_batches_equal_torch_dataloader(transform, tmp_path, collate):
    """Two fastload workers (pixels written by the kernel into shared memory where the collate
    function offers it) give exactly torch's DataLoader batches for the same dataset."""
    urls = write_shards(tmp_path, 8)
    ours = fastload.DataLoader(fastload.ShardDataset(urls, transform=transform), batch_size=3,
                               num_workers=2, collate_fn=collate)
    torchs = torch.utils.data.DataLoader(fastload.ShardDataset(urls, transform=transform), batch_size=3,
                                         num_workers=2, collate_fn=collate)
    pairs = list(zip(ours, torchs, strict=True))
    assert len(pairs) == 4
    for a, b in pairs:
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def _imports(path: pathlib.Path) -> set[str]:
    """Modules a fastload source file imports, as absolute dotted names."""
    package = "fastload" if path.parent == PACKAGE else f"fastload.{path.parent.name}"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(f"{base}.{node.module}".strip(".") if node.module else base)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["text", "collate", "vision", "video_processor", "packing", "mrope", "deferred"])
def test_the_sample_path_does_not_import_the_loader(module):
    """Data flows one way: the transform and collators know nothing of the loader's internals."""
    imported = _imports(PACKAGE / f"{module}.py")
    assert not any(name == "fastload.loader" or name.startswith("fastload.loader.") for name in imported), imported
    assert "fastload.text" in _imports(PACKAGE / "collate.py")  # the walker itself sees imports
