"""WebDataset tar shards -> raw samples: url expansion, rank/worker split, grouping, shuffling.

Samples are grouped exactly as webdataset groups them (key = member path up to the first
dot of the basename), so shards written by either library read the same in both.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch.distributed as dist
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

Sample = dict


# -- error handlers (webdataset's policy: return True to continue, raise to stop) --------
def reraise(exn: BaseException) -> bool:
    raise exn


def warn_and_continue(exn: BaseException) -> bool:
    warnings.warn(f"fastload: skipping after {type(exn).__name__}: {exn}", stacklevel=2)
    return True


def ignore_and_continue(exn: BaseException) -> bool:
    return True


# -- urls ----------------------------------------------------------------------------
def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Brace ranges (``train-{000..099}.tar``), ``::``-separated lists, or any iterable of urls."""
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls).split("::")
    return [u for url in urls for u in braceexpand(str(url))]


def open_url(url: str):
    """A binary stream for a local path, ``pipe:CMD`` or an fsspec url (s3://, gs://, http(s)://)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        return _PipeStream(proc, url)
    if re.match(r"^[a-z][a-z0-9+.-]*://", url) and not url.startswith("file://"):
        try:
            import fsspec
        except ImportError as exc:
            raise ImportError(f"reading {url} needs fsspec (pip install fsspec)") from exc
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb", buffering=1 << 20)


class _PipeStream(io.RawIOBase):
    """A subprocess's stdout that reports a failing command when the stream ends."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.proc.stdout.readinto(buf)
        if n == 0 and self.proc.wait() != 0:
            raise OSError(f"{self.url}: command exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        super().close()


# -- tar -> members -> samples -------------------------------------------------------------
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str, str] | None:
    """``a/b.0.jpg`` -> (``a/b``, ``0.jpg``); None for a member without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


_BLOCK = 512


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, read sequentially.

    A small reader of its own (ustar, GNU long names, pax paths) rather than ``tarfile``,
    because tarfile's stream mode ends quietly at a truncation: here a tar that stops
    before its end-of-archive blocks, or a header with a bad checksum, is an error.
    """
    long_name = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK:
            raise ValueError(f"{url}: truncated tar (ends inside a header, no end-of-archive marker)")
        if header == bytes(_BLOCK):
            return  # end-of-archive marker
        checksum = sum(header[:148]) + 256 + sum(header[156:])
        try:
            valid = _octal(header[148:156]) == checksum
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"{url}: corrupt tar header (bad checksum)")
        size, kind = _octal(header[124:136]), header[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            raise ValueError(f"{url}: truncated tar (member data cut short)")
        _read_exact(stream, -size % _BLOCK)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
        if kind in (b"L", b"x"):
            long_name = data.split(b"\0", 1)[0].decode("utf-8") if kind == b"L" else _pax_path(data)
            continue
        if kind in (b"0", b"\0", b"7"):
            yield (long_name or name), data
        long_name = None


def group_samples(members: Iterable[tuple[str, bytes]], url: str,
                  handler: Callable = reraise) -> Iterator[Sample]:
    """Consecutive members with the same key form one sample (webdataset's rule)."""
    current: Sample | None = None
    for name, data in members:
        parts = split_key(name)
        if parts is None:
            if handler(ValueError(f"{url}: member {name!r} has no key.extension name")):
                continue
        key, ext = parts[0], parts[1].lower()
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        if ext in current:
            if handler(ValueError(f"{url}: duplicate member {name!r} in sample {key!r}")):
                continue
        current[ext] = data
    if current is not None:
        yield current


def read_shard(url: str, handler: Callable = reraise) -> Iterator[Sample]:
    """Samples of one shard; errors go to ``handler`` (a skipped shard ends where it broke)."""
    try:
        stream = open_url(url)
    except Exception as exc:
        if handler(exc):
            return
    try:
        yield from group_samples(tar_members(stream, url), url, handler)
    except ValueError as exc:
        if handler(exc):
            return
    finally:
        stream.close()


# -- placement -------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def shuffle_buffer(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """A bounded shuffle: fill ``size`` samples, then emit a random one per new arrival."""
    buf: list[Sample] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def find_manifest(urls: list[str]) -> dict | None:
    """``PREFIX.manifest.json`` beside ``PREFIX-000000.tar``, when it is there."""
    m = re.match(r"^(.*)-\d+\.tar$", urls[0]) if urls else None
    if not m or "://" in urls[0] or urls[0].startswith("pipe:"):
        return None
    path = m.group(1) + ".manifest.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class ShardDataset(IterableDataset):
    """A torch IterableDataset over WebDataset tar shards yielding raw sample dicts.

    Shards are shuffled by ``(seed, epoch)`` and split across DDP ranks and DataLoader
    workers, so each sample is read exactly once per epoch; ``shuffle=N`` adds a bounded
    sample shuffle buffer. ``transform`` runs on each sample inside the worker.
    """

    def __init__(self, urls: str | Iterable[str], *, shuffle: int = 0, seed: int = 0,
                 resampled: bool = False, transform: Callable | None = None,
                 handler: Callable = reraise):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards match {urls!r}")
        self.shuffle, self.seed, self.resampled = shuffle, seed, resampled
        self.transform, self.handler = transform, handler
        self.epoch = 0
        self._warned_idle = False
        self.consumed = 0  # raw samples this process's stream has produced (for exact resume)
        manifest = find_manifest(self.urls)
        self._counts = self._shard_counts(manifest) if manifest else None

    def _shard_counts(self, manifest: dict) -> dict[str, int] | None:
        by_name = {s["name"]: s["samples"] for s in manifest.get("shards", [])}
        counts = {u: by_name.get(os.path.basename(u)) for u in self.urls}
        return counts if all(v is not None for v in counts.values()) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self) -> list[str]:
        """This rank's shards for the current epoch, in reading order."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(urls)
        rank, world = rank_and_world()
        return urls[rank::world]

    def worker_shards(self) -> list[str]:
        shards = self.rank_shards()
        worker, workers = worker_and_count()
        _, world = rank_and_world()
        if len(self.urls) < world * workers and worker == 0 and not self._warned_idle:
            self._warned_idle = True
            warnings.warn(f"fastload: {len(self.urls)} shards for {world} ranks x {workers} workers: "
                          "some workers get no shard and sit idle", stacklevel=2)
        return shards[worker::workers]

    def __len__(self) -> int:
        if self._counts is None:
            raise TypeError("len() needs the shards' manifest (PREFIX.manifest.json)")
        if self.resampled:
            raise TypeError("a resampled ShardDataset has no length")
        return sum(self._counts[u] for u in self.rank_shards())

    def _rng(self, stream: str) -> random.Random:
        rank, _ = rank_and_world()
        worker, _ = worker_and_count()
        return random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}/{stream}")

    def raw_samples(self) -> Iterator[Sample]:
        """This worker's raw samples for the epoch, before ``transform``."""
        if self.resampled:
            rng, urls = self._rng("resample"), self.urls
            shards = (rng.choice(urls) for _ in iter(int, 1))
        else:
            shards = self.worker_shards()
        samples = (s for url in shards for s in read_shard(url, self.handler))
        if self.shuffle:
            samples = shuffle_buffer(samples, self.shuffle, self._rng("samples"))
        return samples

    def __iter__(self) -> Iterator:
        return self.iter_from(0)

    def iter_from(self, skip: int) -> Iterator:
        """The stream after its first ``skip`` raw samples (read, not transformed): an exact
        resume costs only tar reading for what was already delivered."""
        samples = self.raw_samples()
        self.consumed = 0
        for _ in range(skip):
            if next(samples, None) is None:
                return
            self.consumed += 1
        for sample in samples:
            self.consumed += 1
            if self.transform is None:
                yield sample
                continue
            try:
                out = self.transform(sample)
            except Exception as exc:
                if self.handler(exc):
                    continue
                raise
            if out is not None:
                yield out
