"""One error policy, per sample, counted exactly: real corrupt shards (truncated, unreadable,
keyless and duplicate members, undecodable images, bad records) read through the loader."""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

import pytest
import torch

import fastload
from fastload.decode import decode
from fastload.shards import ShardDataset
from fastload.writer import ShardWriter

from .conftest import jpeg_bytes, photo_like


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def one_sample_shards(tmp_path, n=6, truncate=2, manifest=True):
    """``n`` one-sample shards; shard ``truncate`` is cut inside its member data."""
    writer = ShardWriter(str(tmp_path / "one"), maxcount=1)
    for i in range(n):
        writer.write(f"s{i}", {"cls": str(i).encode(), "bin": os.urandom(3000)})
    writer.close({})
    if not manifest:
        os.remove(tmp_path / "one.manifest.json")
    path = tmp_path / f"one-{truncate:06d}.tar"
    data = path.read_bytes()
    path.write_bytes(data[:1500])
    return str(tmp_path / ("one-{000000..%06d}.tar" % (n - 1)))


def cls(sample):
    return int(sample["cls"])


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_one_truncated_shard_of_six_costs_one_sample(tmp_path, workers, manifest):
    urls = one_sample_shards(tmp_path, manifest=manifest)
    loader = fastload.DataLoader(ShardDataset(urls, transform=cls), batch_size=2, num_workers=workers,
                                 on_error="skip")
    got = sorted(i for b in loader for i in b.tolist())
    assert got == [0, 1, 3, 4, 5]
    assert loader.stats["skipped"] == 1
    assert loader.stats["by_cause"] == {"truncated shard": 1}
    assert list(loader.stats["by_shard"]) == [urls.replace("{000000..000005}", "000002")]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def record(i):
    return json.dumps({"id": i}).encode()


def image_record(sample):
    """A transform that really decodes: the record's id and the image's mean."""
    rgb = decode(sample["jpg"])
    return torch.tensor([json.loads(sample["json"])["id"], int(rgb.mean() > -1)])


def faulty_shards(tmp_path):
    """Five shards of 4 samples (20), 9 of them bad, each fault of a different kind.

    0: all good.  1: sample 1 has an undecodable image, sample 2 a record that is not JSON.
    2: a member with no extension (passed over, as webdataset does); sample 3 holds a duplicate.
    3: truncated inside sample 2 (samples 2 and 3 lost).  4: missing (4 lost, counted from the
    manifest that fastload-shard would have written)."""
    jpg = jpeg_bytes(photo_like(40, 56))
    good = lambda k, i: [(f"{k}.json", record(i)), (f"{k}.jpg", jpg)]  # noqa: E731
    _tar(tmp_path / "t-000000.tar", [m for i in range(4) for m in good(f"a{i}", i)])
    _tar(tmp_path / "t-000001.tar", good("b0", 4) + [("b1.json", record(5)), ("b1.jpg", b"\xff\xd8garbage")]
         + [("b2.json", b"{not json"), ("b2.jpg", jpg)] + good("b3", 7))
    _tar(tmp_path / "t-000002.tar", good("c0", 8) + [("README", b"x")] + good("c1", 9) + good("c2", 10)
         + good("c3", 11) + [("c3.jpg", jpg)])
    _tar(tmp_path / "t-000003.tar", [m for i in range(4) for m in good(f"d{i}", 12 + i)])
    data = (tmp_path / "t-000003.tar").read_bytes()
    cut = data.index(b"d2.jpg") + 600
    (tmp_path / "t-000003.tar").write_bytes(data[:cut])
    urls = [str(tmp_path / f"t-{i:06d}.tar") for i in range(5)]
    manifest = {"shards": [{"name": os.path.basename(u), "samples": 4} for u in urls]}
    (tmp_path / "t.manifest.json").write_text(json.dumps(manifest))
    return urls


EXPECTED = {0, 1, 2, 3, 4, 7, 8, 9, 10, 12, 13}
BY_CAUSE = {"ImageDecodeError": 1, "JSONDecodeError": 1, "corrupt member": 1,
            "truncated shard": 2, "unreadable shard": 4}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_fault_costs_its_samples_and_is_counted(tmp_path, workers):
    urls = faulty_shards(tmp_path)
    ds = ShardDataset(urls, transform=image_record)
    loader = fastload.DataLoader(ds, batch_size=3, num_workers=workers, on_error="skip")
    got = [int(i) for b in loader for i in b[:, 0].tolist()]
    assert sorted(got) == sorted(EXPECTED) and len(got) == len(EXPECTED)
    assert loader.stats["skipped"] == 20 - len(EXPECTED)
    assert loader.stats["by_cause"] == BY_CAUSE
    by_shard = {os.path.basename(k): v for k, v in loader.stats["by_shard"].items()}
    assert by_shard == {"t-000001.tar": 2, "t-000002.tar": 1, "t-000003.tar": 2, "t-000004.tar": 4}


def test_the_loader_policy_is_inherited_and_the_dataset_can_override_it(tmp_path):
    urls = one_sample_shards(tmp_path)
    inherit = fastload.DataLoader(ShardDataset(urls, transform=cls), batch_size=2, on_error="warn")
    assert len([i for b in inherit for i in b.tolist()]) == 5
    strict = fastload.DataLoader(ShardDataset(urls, transform=cls, on_error="raise"), batch_size=2,
                                 on_error="skip")
    with pytest.raises(ValueError, match="truncated"):
        list(strict)
    with pytest.raises(ValueError, match="truncated"):  # the default is to raise
        list(fastload.DataLoader(ShardDataset(urls, transform=cls), batch_size=2))


def test_skips_keep_batch_boundaries(tmp_path):
    """A skipped sample shrinks its batch instead of pulling the next one in: batch counts do
    not depend on how much data is bad (DDP ranks stay in step)."""
    urls = one_sample_shards(tmp_path)
    loader = fastload.DataLoader(ShardDataset(urls, transform=cls), batch_size=2, on_error="skip")
    assert [b.tolist() for b in loader] == [[0, 1], [3], [4, 5]]


class PendingBomb:
    """Pixels written at hand-over time, like vision.PendingPatches, whose write fails as the
    kernel's does when it cannot allocate."""

    def __init__(self, value, fail):
        self.value, self.fail = value, fail
        self.shape, self.dtype = (1, 4), torch.float32
        self.nbytes = 16

    def write_into(self, out):
        if self.fail:
            raise MemoryError("fastload._kernels: out of memory (std::bad_alloc)")
        out.fill_(self.value)

    def tensor(self):
        out = torch.empty(self.shape)
        self.write_into(out)
        return out


class Pending(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"i": i, "pixels": PendingBomb(float(i), fail=i == 4)}


def collate_pending(samples):
    from fastload.deferred import Concat
    return {"i": torch.tensor([s["i"] for s in samples]), "pixels": Concat([s["pixels"] for s in samples])}


def test_a_failing_kernel_write_costs_only_its_sample():
    loader = fastload.DataLoader(Pending(), batch_size=3, num_workers=1, collate_fn=collate_pending,
                                 on_error="skip")
    batches = list(loader)
    assert [b["i"].tolist() for b in batches] == [[0, 1, 2], [3, 5]]
    assert batches[1]["pixels"][:, 0].tolist() == [3.0, 5.0]
    assert loader.stats["by_cause"] == {"MemoryError": 1} and loader.stats["skipped"] == 1
    with pytest.raises(MemoryError):
        list(fastload.DataLoader(Pending(), batch_size=3, num_workers=1, collate_fn=collate_pending))

