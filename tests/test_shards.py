"""ShardDataset against the webdataset library and GNU tar, placement, shuffling and bad input."""
from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import re
import subprocess
import tarfile
import warnings

import pytest
import torch
import webdataset as wds

import fastload
from fastload.shards import ShardDataset, expand_urls, split_key
from fastload.writer import ShardWriter


def _strip(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}


def make_shards(tmp_path, n_shards=4, per_shard=5, prefix="data") -> list[str]:
    writer = ShardWriter(str(tmp_path / prefix), maxcount=per_shard)
    for i in range(n_shards * per_shard):
        writer.write(f"s{i:04d}", {"txt": f"sample {i}".encode(), "cls": str(i).encode()})
    writer.close({"images": {}})
    return sorted(str(p) for p in tmp_path.glob(f"{prefix}-*.tar"))


def test_split_key_follows_webdataset():
    assert split_key("a/b.0.jpg") == ("a/b", "0.jpg")
    assert split_key("dir.v2/x.json") == ("dir.v2/x", "json")
    assert split_key("noext") is None


def test_reads_webdataset_tarwriter_shards_like_webdataset(tmp_path):
    path = str(tmp_path / "wds-000000.tar")
    with wds.TarWriter(path) as sink:
        for i in range(7):
            sink.write({"__key__": f"dir/sub.x/k{i}", "txt": f"t{i}", "0.jpg": b"\xff\xd8" + bytes([i]),
                        "JSON": {"i": i}})
    ours = [_strip(s) for s in ShardDataset(path)]
    theirs = [_strip(s) for s in wds.WebDataset(path, shardshuffle=False)]
    assert ours == theirs and len(ours) == 7
    assert ours[3]["__key__"] == "dir/sub.x/k3" and "0.jpg" in ours[3]


def test_reads_gnu_tar_shards_like_webdataset(tmp_path):
    src = tmp_path / "src"
    (src / "part").mkdir(parents=True)
    for i in range(5):
        (src / "part" / f"{i:03d}.txt").write_text(f"hello {i}")
        (src / "part" / f"{i:03d}.meta.json").write_text(f'{{"i": {i}}}')
    path = str(tmp_path / "gnu.tar")
    subprocess.run(["tar", "cf", path, "-C", str(src), "--sort=name", "part"], check=True)
    ours = [_strip(s) for s in ShardDataset(path)]
    theirs = [_strip(s) for s in wds.WebDataset(path, shardshuffle=False)]
    assert ours == theirs and len(ours) == 5 and ours[0]["meta.json"] == b'{"i": 0}'


def test_our_shards_read_by_webdataset(tmp_path):
    urls = make_shards(tmp_path)
    ours = [_strip(s) for s in ShardDataset(urls)]
    theirs = [_strip(s) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert ours == theirs and len(ours) == 20


def test_url_forms(tmp_path):
    urls = make_shards(tmp_path)
    brace = str(tmp_path / "data-{000000..000003}.tar")
    assert expand_urls(brace) == urls
    expected = [s["__key__"] for s in ShardDataset(urls)]
    assert [s["__key__"] for s in ShardDataset(brace)] == expected
    assert [s["__key__"] for s in ShardDataset(["file://" + u for u in urls])] == expected
    assert [s["__key__"] for s in ShardDataset([f"pipe:cat {u}" for u in urls])] == expected


def test_fsspec_urls(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    url = make_shards(tmp_path, n_shards=1)[0]
    with fsspec.open("memory://bucket/a.tar", "wb") as f:
        f.write(open(url, "rb").read())
    assert len(list(ShardDataset("memory://bucket/a.tar"))) == 5


def test_len_from_manifest_and_no_manifest(tmp_path):
    urls = make_shards(tmp_path)
    assert len(ShardDataset(urls)) == 20
    os.remove(tmp_path / "data.manifest.json")
    assert len(ShardDataset(urls)) == 20  # counted from the tar headers
    piped = [f"pipe:cat {u}" for u in ShardDataset(urls).urls]
    with pytest.raises(TypeError, match="manifest"):
        len(ShardDataset(piped))


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (2, 3), (3, 2)])
def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, monkeypatch, workers, world):
    urls = make_shards(tmp_path, n_shards=5, per_shard=3)
    seen = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ds = ShardDataset(urls, shuffle=4, seed=1, even_ranks=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                                 collate_fn=lambda s: s["__key__"])
            seen += list(loader)
    assert sorted(seen) == sorted(f"s{i:04d}" for i in range(15))


def test_fewer_shards_than_workers_warns_and_loses_nothing(tmp_path):
    """One shard, three workers: each sample is read once over all workers, with one warning."""
    urls = make_shards(tmp_path, n_shards=1)
    ds = ShardDataset(urls)
    keys = []
    with pytest.warns(UserWarning, match="idle") as warned:
        for worker in range(3):  # as torch's worker loop sets it up in each worker process
            info = torch.utils.data._utils.worker.WorkerInfo(id=worker, num_workers=3, seed=0, dataset=ds)
            torch.utils.data._utils.worker._worker_info = info
            try:
                keys += [s["__key__"] for s in ds]
            finally:
                torch.utils.data._utils.worker._worker_info = None
    assert sorted(keys) == [f"s{i:04d}" for i in range(5)]
    assert len([w for w in warned if "idle" in str(w.message)]) == 1


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    urls = make_shards(tmp_path)
    ds = ShardDataset(urls, shuffle=6, seed=3)
    a = [s["__key__"] for s in ds]
    b = [s["__key__"] for s in ds]
    ds.set_epoch(1)
    c = [s["__key__"] for s in ds]
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(set(a))
    assert a != sorted(a)


def test_resampled_is_endless(tmp_path):
    urls = make_shards(tmp_path, n_shards=2)
    it = iter(ShardDataset(urls, resampled=True, seed=1))
    keys = [next(it)["__key__"] for _ in range(50)]
    assert len(keys) == 50 and set(keys) <= {f"s{i:04d}" for i in range(10)}


def test_transform_runs_per_sample(tmp_path):
    urls = make_shards(tmp_path, n_shards=1)
    ds = ShardDataset(urls, transform=lambda s: int(s["cls"]))
    assert list(ds) == [0, 1, 2, 3, 4]


# -- bad input -------------------------------------------------------------------------------
def _truncated(tmp_path) -> str:
    url = make_shards(tmp_path, n_shards=1, per_shard=20)[0]
    data = open(url, "rb").read()
    bad = str(tmp_path / "trunc.tar")
    open(bad, "wb").write(data[: len(data) // 2 + 100])
    return bad


def test_truncated_tar(tmp_path, caplog):
    bad = _truncated(tmp_path)
    with pytest.raises(ValueError, match="truncated"):
        list(ShardDataset(bad))
    partial = list(ShardDataset(bad, on_error="warn"))
    assert "skipping the rest of" in caplog.text and "truncated shard" in caplog.text
    assert 0 < len(partial) < 20
    assert all(s["txt"] == f"sample {int(s['cls'])}".encode() for s in partial)


def test_truncated_shard_does_not_stop_the_next(tmp_path):
    bad = _truncated(tmp_path)
    good = make_shards(tmp_path, n_shards=1, prefix="good")[0]
    keys = [s["__key__"] for s in ShardDataset([bad, good], on_error="skip")]
    assert keys[-5:] == [f"s{i:04d}" for i in range(5)]


def test_member_without_key_and_garbage(tmp_path):
    path = str(tmp_path / "nokey.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in (("README", b"x"), ("a.txt", b"1"), ("b.txt", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [s["__key__"] for s in ShardDataset(path)] == ["a", "b"]  # passed over, as webdataset does
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(ValueError):
        list(ShardDataset(str(junk)))
    assert list(ShardDataset(str(junk), on_error="skip")) == []


def test_missing_shard_and_no_match(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(ShardDataset(str(tmp_path / "missing.tar")))
    with pytest.raises(ValueError, match="no shards"):
        ShardDataset([])


def test_transform_errors_follow_the_policy(tmp_path):
    urls = make_shards(tmp_path, n_shards=1)

    def picky(sample):
        if sample["cls"] == b"2":
            raise KeyError("missing field")
        return int(sample["cls"])

    with pytest.raises(KeyError):
        list(ShardDataset(urls, transform=picky))
    assert list(ShardDataset(urls, transform=picky, on_error="skip")) == [0, 1, 3, 4]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is not a module
        return False


def test_public_api_exports():
    """Every ``fastload.…`` name the README uses exists, and ``__all__`` lists only real names."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    for dotted in sorted(set(re.findall(r"\bfastload(?:\.[A-Za-z_]\w*)+", readme))):
        parts = dotted.split(".")
        depth = next(i for i in range(len(parts), 0, -1) if _is_module(".".join(parts[:i])))
        obj = importlib.import_module(".".join(parts[:depth]))
        for attr in parts[depth:]:
            assert hasattr(obj, attr), f"the README names {dotted}, which does not exist"
            obj = getattr(obj, attr)
    assert [name for name in fastload.__all__ if not hasattr(fastload, name)] == []
