"""Remote shards against real servers on 127.0.0.1: moto's S3 and a plain HTTP server that counts
requests and injects faults. Shards are made by fastload-shard; what the loader reads from a
server must equal what it reads from local disk."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import warnings
from collections import Counter

import pytest

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

import fastload
from fastload import remote
from fastload.cli.shard import main as shard_main
from fastload.shards import ShardDataset, ShardError

from .conftest import jpeg_bytes, photo_like
from .servers import FileServer, S3Server

N_SHARDS, PER_SHARD = 4, 8
CHUNK = 32 << 10  # several range requests per shard, so that faults can hit mid-shard
PATTERN = "d-{000000..%06d}.tar" % (N_SHARDS - 1)
SHARD_NAMES = [f"d-{i:06d}.tar" for i in range(N_SHARDS)]


@pytest.fixture(autouse=True)
def _settings(monkeypatch):
    """Small chunks and fast backoff; worker processes inherit the environment."""
    monkeypatch.setenv("FASTLOAD_REMOTE_CHUNK", str(CHUNK))
    monkeypatch.setenv("FASTLOAD_REMOTE_READ_AHEAD", str(2 * CHUNK))
    monkeypatch.setenv("FASTLOAD_REMOTE_BACKOFF", "0.01")
    monkeypatch.setenv("FASTLOAD_REMOTE_RETRIES", "3")
    monkeypatch.setenv("FASTLOAD_REMOTE_TIMEOUT", "5")  # a stalled pooled connection costs 5 s, not 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> str:
    """Shards written by fastload-shard from generated chat records with photo-like JPEGs."""
    root = tmp_path_factory.mktemp("remote_src")
    (root / "img").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(N_SHARDS * PER_SHARD):
            (root / f"img/{i}.jpg").write_bytes(jpeg_bytes(photo_like(160, 200, i), quality=95))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>What is {i}?"},
                                             {"role": "assistant", "content": f"It is {i}."}],
                                "images": [f"img/{i}.jpg"]}) + "\n")
    out = root / "shards"
    with pytest.raises(SystemExit) as exit_:
        shard_main([str(root / "data.jsonl"), str(out / "d"), "--maxcount", str(PER_SHARD), "--quiet"])
    assert exit_.value.code == 0
    return str(out)


@pytest.fixture(scope="module")
def http(shard_dir):
    server = FileServer(shard_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(shard_dir):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    server = S3Server()
    with server.environment():  # the backend's usual credentials, seen by forked ranks too
        server.upload(shard_dir, "shards", SHARD_NAMES)
        yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_http(request):
    """Counts start at zero, after the downloads an earlier test left behind have wound down."""
    remote.cancel_pending()
    for thread in threading.enumerate():
        if thread.name == "fastload-download":
            thread.join(timeout=10)
    if "http" in request.fixturenames:
        request.getfixturevalue("http").reset()


def plain(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


@pytest.fixture(scope="module")
def local(shard_dir) -> list[dict]:
    return plain(ShardDataset(os.path.join(shard_dir, PATTERN)))


def keys(loader) -> list[str]:
    return [k for batch in loader for k in batch]


def key_of(sample) -> str:
    return sample["__key__"]


def loader_for(urls: str, workers: int = 0, **kw):
    ds = ShardDataset(urls, transform=key_of, **{k: v for k, v in kw.items() if k.startswith("cache")})
    return fastload.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=list,
                               on_error=kw.get("on_error", "raise"))


# -- same samples as local disk --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["http", "s3"])
def test_samples_equal_local_disk(request, backend, local):
    base = request.getfixturevalue("http").url if backend == "http" else "s3://shards"
    request.getfixturevalue(backend)
    assert plain(ShardDataset(f"{base}/{PATTERN}")) == local
    loader = loader_for(f"{base}/{PATTERN}", workers=2)
    assert sorted(keys(loader)) == sorted(s["__key__"] for s in local)


def test_read_ahead_starts_next_shard_before_current_is_done(http, local):
    """While the first shard is still being read, the second one's download has begun."""
    it = iter(ShardDataset(f"{http.url}/{PATTERN}"))
    next(it)
    deadline = time.monotonic() + 10
    while not http.requests[("GET", SHARD_NAMES[1])] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.requests[("GET", SHARD_NAMES[1])] >= 1
    assert len(list(it)) == len(local) - 1


# -- faults ----------------------------------------------------------------------------------
def test_503_twice_then_success(http, local):
    http.fail(SHARD_NAMES[1], "503", "503")
    assert plain(ShardDataset(f"{http.url}/{PATTERN}")) == local
    chunks = -(-os.path.getsize(os.path.join(http.root, SHARD_NAMES[1])) // CHUNK)
    assert http.requests[("GET", SHARD_NAMES[1])] == chunks + 2


def test_connection_dropped_mid_shard_is_resumed(http, local):
    http.fail(SHARD_NAMES[2], "ok", "ok", "drop")  # the third range request is cut halfway
    assert plain(ShardDataset(f"{http.url}/{PATTERN}")) == local


def test_truncated_response_once_is_retried(http, local):
    http.fail(SHARD_NAMES[0], "ok", "short")
    assert plain(ShardDataset(f"{http.url}/{PATTERN}")) == local


def test_server_without_range_support_is_read_once(http, local):
    http.fail(SHARD_NAMES[0], "norange+")
    assert plain(ShardDataset(f"{http.url}/{PATTERN}")) == local
    assert http.requests[("GET", SHARD_NAMES[0])] == 1


@pytest.mark.parametrize("fault,cause", [("short+", "truncated shard"), ("drop+", "unreadable shard")])
def test_persistent_fault_mid_shard_skips_the_rest_counted(http, local, fault, cause):
    http.fail(SHARD_NAMES[1], "ok", fault)  # the first chunk arrives, then never another
    loader = loader_for(f"{http.url}/{PATTERN}", on_error="skip")
    got = keys(loader)
    lost = [s["__key__"] for s in local[PER_SHARD:2 * PER_SHARD] if s["__key__"] not in got]
    assert got == [s["__key__"] for s in local if s["__key__"] not in lost]
    assert lost and loader.stats["by_cause"] == {cause: len(lost)}  # the manifest: each lost sample counts
    http.reset()
    http.fail(SHARD_NAMES[1], "ok", fault)
    with pytest.raises(ShardError, match="tries"):
        keys(loader_for(f"{http.url}/{PATTERN}", on_error="raise"))


def test_manifest_beside_remote_shards_gives_counts_without_reading(http, local):
    ds = ShardDataset(f"{http.url}/{PATTERN}")
    assert ds.counts() == {f"{http.url}/{n}": PER_SHARD for n in SHARD_NAMES} and len(ds) == len(local)
    assert http.total("GET") == 1 and http.total("HEAD") == 0  # the manifest alone


def test_missing_shard_is_unreadable_without_retries(http, local):
    urls = [f"{http.url}/{n}" for n in SHARD_NAMES[:2]] + [f"{http.url}/missing.tar"]
    loader = fastload.DataLoader(ShardDataset(urls, transform=key_of), batch_size=4, collate_fn=list,
                                 on_error="skip")
    assert keys(loader) == [s["__key__"] for s in local[:2 * PER_SHARD]]
    assert loader.stats["by_cause"] == {"unreadable shard": 1}
    assert http.requests[("HEAD", "missing.tar")] + http.requests[("GET", "missing.tar")] <= 2


def test_first_chunk_failing_for_good_is_an_unreadable_shard(http, local):
    http.fail(SHARD_NAMES[3], "503+")
    loader = loader_for(f"{http.url}/{PATTERN}", on_error="skip")
    assert keys(loader) == [s["__key__"] for s in local[:3 * PER_SHARD]]
    assert loader.stats["by_cause"] == {"unreadable shard": PER_SHARD}
    assert http.requests[("GET", SHARD_NAMES[3])] == 4  # the first try and three retries


# -- the cache -------------------------------------------------------------------------------
def cache_bytes(path) -> int:
    """Bytes in the cache directory now (a file evicted while we look counts nothing)."""
    total = 0
    for entry in os.scandir(path):
        try:
            total += 0 if entry.name.startswith(".") else entry.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_cache_reused_on_second_epoch(http, local, tmp_path):
    loader = loader_for(f"{http.url}/{PATTERN}", workers=2, cache_dir=str(tmp_path / "c"),
                        cache_limit=10 << 20)
    first = sorted(keys(loader))
    fetched = http.total("GET")
    assert fetched >= N_SHARDS
    second = sorted(keys(loader))
    assert first == second == sorted(s["__key__"] for s in local)
    assert http.total("GET") == fetched and http.total("HEAD") == N_SHARDS  # nothing asked again
    cached = sorted(os.listdir(tmp_path / "c"))
    assert [n for n in cached if n.endswith(".part")] == []
    for name in SHARD_NAMES:  # every cached file is the whole shard
        (entry,) = [n for n in cached if n.endswith(name)]
        with open(tmp_path / "c" / entry, "rb") as a, open(os.path.join(http.root, name), "rb") as b:
            assert a.read() == b.read()


def test_cache_never_exceeds_its_limit(http, local, tmp_path):
    """Limit of two and a half shards, read by a transform that measures the directory at
    every sample, two epochs with two workers sharing it."""
    size = os.path.getsize(os.path.join(http.root, SHARD_NAMES[0]))
    limit, cache = int(size * 2.5), str(tmp_path / "c")
    peaks = []

    def measure(sample):
        peaks.append(cache_bytes(cache))
        return sample["__key__"]

    ds = ShardDataset(f"{http.url}/{PATTERN}", transform=measure, cache_dir=cache, cache_limit=limit)
    for _ in range(2):
        assert sorted(ds) == sorted(s["__key__"] for s in local)
    assert max(peaks) <= limit and cache_bytes(cache) <= limit
    assert 0 < len([n for n in os.listdir(cache) if n.endswith(".tar")]) <= 2


def _hammer(url: str, cache: str, limit: int, rounds: int, out) -> None:
    for _ in range(rounds):
        with remote.open_remote(url, cache_dir=cache, cache_limit=limit) as stream:
            data = stream.read()
        out.put((url, len(data), cache_bytes(cache)))


def test_cache_shared_by_processes(http, tmp_path):
    """Four processes read the four shards concurrently through one small cache: every read
    is whole, the limit holds, and no partial file is left behind."""
    size = os.path.getsize(os.path.join(http.root, SHARD_NAMES[0]))
    cache, limit = str(tmp_path / "c"), int(size * 2.2)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(f"{http.url}/{name}", cache, limit, 3, out))
             for name in SHARD_NAMES]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(12)]
    for p in procs:
        p.join(timeout=30)
    assert all(n == size for _, n, _ in results)
    assert max(used for _, _, used in results) <= limit
    assert [n for n in os.listdir(cache) if n.endswith(".part")] == []


def test_interrupted_download_leaves_no_complete_looking_file(http, tmp_path):
    cache = str(tmp_path / "c")
    stream = remote.open_remote(f"{http.url}/{SHARD_NAMES[0]}", cache_dir=cache, cache_limit=10 << 20)
    stream.read(1000)
    stream.close()  # the reader stops early: the unfinished download is dropped
    stream.download.join(timeout=10)
    assert [n for n in os.listdir(cache) if not n.startswith(".")] == []


def test_stale_part_file_of_a_dead_process_is_reclaimed(tmp_path):
    cache = remote.Cache(str(tmp_path), limit=1000)
    (tmp_path / "x-d.tar.900.1-0.part").write_bytes(b"\0" * 900)  # reserved 900, nobody holds it
    entry = cache.begin("http://h/d.tar", 500)
    assert entry is not None and not (tmp_path / "x-d.tar.900.1-0.part").exists()
    entry.abort()


# -- ranks x workers -------------------------------------------------------------------------
def test_ranks_times_workers_read_remote_shards_exactly_once(s3, tmp_path):
    """Two real ranks (gloo), two loader workers each, shards on the S3 server: every sample
    once per epoch (35 samples, even_ranks="drop": 17 per rank), the same number of batches
    on both ranks, a collective after every batch."""
    from .test_distributed import ALL, make_shards, run_ranks

    make_shards(tmp_path)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tar"))
    s3.upload(str(tmp_path), "dist", names)
    urls = "s3://dist/d-{000000..%06d}.tar" % (len(names) - 1)
    ranks = run_ranks(2, {"kind": "shards", "urls": urls, "even": "drop", "epochs": 2,
                          "out": str(tmp_path / "out")})
    for epoch in range(2):
        samples = [r[epoch] for r in ranks]
        assert [len(s) for s in samples] == [len(ALL) // 2] * 2
        counts = Counter(i for s in samples for i in s)
        assert max(counts.values()) == 1 and len(ALL) - len(counts) < 2


# -- small parts -----------------------------------------------------------------------------
def test_redact_hides_credentials_and_signatures():
    text = "GET https://user:secret@host/b/d.tar?X-Amz-Signature=abc&token=t failed; s3://k@bucket/x"
    shown = remote.redact(text)
    assert "secret" not in shown and "abc" not in shown and "token" not in shown and "k@" not in shown
    assert "https://host/b/d.tar" in shown and "s3://bucket/x" in shown


def test_transient_faults_are_told_apart():
    class Response(Exception):
        def __init__(self, status):
            self.status = status

    assert remote.is_transient(ConnectionResetError())
    assert remote.is_transient(Response(503)) and remote.is_transient(Response(429))
    assert not remote.is_transient(Response(403)) and not remote.is_transient(FileNotFoundError("x"))
    try:
        try:
            raise Response(500)
        except Response as exc:
            raise FileNotFoundError("http://h/x") from exc  # as fsspec's HTTP info() wraps it
    except FileNotFoundError as wrapped:
        assert remote.is_transient(wrapped)


def test_retries_back_off_then_give_up():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    settings = remote.Settings(retries=3, backoff=0.1)
    with pytest.raises(remote.RemoteError, match="after 4 tries"):
        remote.with_retries(flaky, settings, "https://u:p@h/x", sleep=sleeps.append)
    assert len(calls) == 4 and len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]
