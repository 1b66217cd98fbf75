"""WebDataset tar shards -> samples: url expansion, tar reading under the error policy, the
rank/worker split (even across DDP ranks), shuffling, and the origins an exact resume records.

Samples are grouped exactly as webdataset groups them (key = member path up to the first
dot of the basename), so shards written by either library read the same in both.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator

import torch.distributed as dist
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from .errors import Skip, check_policy, resolve, skip_for
from .progress import Origin, Progress


# -- urls ----------------------------------------------------------------------------
def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Brace ranges (``train-{000..099}.tar``), ``::``-separated lists, or any iterable of urls;
    ``$VAR``/``${VAR}`` and ``~`` are expanded first, as webdataset does."""
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls).split("::")
    return [u for url in urls for u in braceexpand(os.path.expanduser(os.path.expandvars(str(url))))]


def open_url(url: str, cache_dir: str | None = None, cache_limit: int | None = None):
    """A binary stream for a local path, ``pipe:CMD`` or a remote url (s3://, gs://, http(s)://,
    hf://, any fsspec protocol). Remote shards stream through :mod:`fastload.remote`: read
    ahead, retried, and kept in the shard cache ``cache_dir`` (at most ``cache_limit`` bytes)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        return _PipeStream(proc, url)
    if re.match(r"^[a-z][a-z0-9+.-]*://", url) and not url.startswith("file://"):
        from .remote import open_remote

        return open_remote(url, cache_dir=cache_dir, cache_limit=cache_limit)
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


_CHUNK = 16 << 20
_MAX_MEMBER = 1 << 40  # a size field beyond this is a corrupt header, not a member to read


def _read_exact(stream, n: int) -> bytes:
    """``n`` bytes, or fewer at the end of the stream; read in chunks, so a size field that
    lies costs no more memory than the stream really holds."""
    parts, left = [], n
    while left > 0:
        more = stream.read(min(left, _CHUNK))
        if not more:
            break
        parts.append(more)
        left -= len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes, url: str) -> str | None:
    """The ``path`` record of a pax extended header, if any (records are ``LEN key=value\n``)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if space <= pos or length <= space - pos or pos + length > len(data):
            raise ShardError("corrupt shard", f"{url}: corrupt pax header record")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


class ShardError(ValueError, tarfile.ReadError):
    """A shard that cannot be read on: the rest of it is lost (``cause`` names why). A
    ``ValueError``, and a ``tarfile.ReadError`` as webdataset's reader raises."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class MemberError(ValueError):
    """A tar member that belongs to no well-formed sample: that sample is lost."""

    cause = "corrupt member"


def tar_entries(stream, url: str, with_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """:func:`_tar_entries`, with a gzip stream's own errors reported as the shard's."""
    try:
        yield from _tar_entries(stream, url, with_data)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise ShardError("corrupt shard", f"{url}: corrupt gzip stream ({exc})") from exc
    except EOFError as exc:
        raise ShardError("truncated shard", f"{url}: gzip stream cut short ({exc})") from exc


def _tar_entries(stream, url: str, with_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular file in a tar stream, read sequentially; with
    ``with_data=False`` the bytes are skipped (seeked over where possible) and None.

    A small reader of its own (ustar, GNU long names, pax paths) rather than ``tarfile``,
    because tarfile's stream mode ends quietly at a truncation: here a tar that stops
    before its end-of-archive blocks, or a header with a bad checksum, is a ShardError.
    """
    long_name = None
    seekable = not with_data and getattr(stream, "seekable", lambda: False)()
    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK:
            raise ShardError("truncated shard", f"{url}: truncated tar (ends inside a header, "
                             "no end-of-archive marker)")
        if header == bytes(_BLOCK):
            if long_name is not None:
                raise ShardError("corrupt shard", f"{url}: end of archive right after a long-name header")
            return  # end-of-archive marker
        checksum = sum(header[:148]) + 256 + sum(header[156:])
        try:
            valid = _octal(header[148:156]) == checksum
        except ValueError:
            valid = False
        if not valid:
            raise ShardError("corrupt shard", f"{url}: corrupt tar header (bad checksum)")
        size, kind = _octal(header[124:136]), header[156:157]
        if size > _MAX_MEMBER:
            raise ShardError("corrupt shard", f"{url}: corrupt tar header (member size {size})")
        padded = size + (-size % _BLOCK)
        meta = kind in (b"L", b"x")
        if seekable and not meta:
            data = None
            end = stream.seek(padded, io.SEEK_CUR)
            if end > _stream_size(stream):
                raise ShardError("truncated shard", f"{url}: truncated tar (member data cut short)")
        else:
            data = _read_exact(stream, size)
            if len(data) < size:
                raise ShardError("truncated shard", f"{url}: truncated tar (member data cut short)")
            _read_exact(stream, padded - size)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
        if meta:
            long_name = (data.split(b"\0", 1)[0].decode("utf-8", "replace") if kind == b"L"
                         else _pax_path(data, url)) or ""
            continue
        if kind in (b"0", b"\0", b"7"):
            yield (long_name or name), data
        elif kind == b"S":
            yield (long_name or name), SPARSE
        long_name = None


def _stream_size(stream) -> int:
    size = getattr(stream, "_fastload_size", None)
    if size is None:
        here = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(here)
        try:
            stream._fastload_size = size
        except AttributeError:
            pass
    return size


SPARSE = object()  # what tar_entries yields for a GNU sparse member's data (not read)
_META = re.compile(r"__[^/]*__($|/)")


def _is_meta(name: str) -> bool:
    """webdataset's metadata members (``__index__``, ``__meta__/…``): not part of any sample."""
    return bool(_META.match(name))


def group_samples(members: Iterable[tuple[str, bytes | None]], url: str
                  ) -> Iterator[tuple[dict, MemberError | None]]:
    """Consecutive members with the same key form one sample (webdataset's rule); members
    without a ``key.extension`` name and metadata members are passed over, as webdataset does.

    Yields ``(sample, None)``, or ``(partial sample, error)`` for a sample that holds a
    duplicate or an unreadable (GNU sparse) member: each occupies one sample position, so
    positions agree with :func:`count_samples`.
    """
    current: dict | None = None
    error: MemberError | None = None
    for name, data in members:
        parts = None if _is_meta(name) else split_key(name)
        if parts is None:
            continue
        key, ext = parts[0], parts[1].lower()
        if current is not None and current["__key__"] != key:
            yield current, error
            current, error = None, None
        if current is None:
            current = {"__key__": key, "__url__": url}
        if error is None and (ext in current or data is SPARSE):
            why = "is a GNU sparse file" if data is SPARSE else f"is a duplicate in sample {key!r}"
            error = MemberError(f"{url}: member {name!r} {why}")
        current[ext] = data
    if current is not None:
        yield current, error


def _decompressed(stream, url: str):
    """The tar stream itself, or its gzip decompression (``.tar.gz``/``.tgz``, or gzip magic)."""
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    if head == b"\x1f\x8b" or url.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    return stream


def count_samples(url: str, remote: dict | None = None) -> int:
    """Samples in one shard, from its tar headers alone (member data is seeked over). A
    shard that breaks off counts the sample it breaks off in: reading it then loses (and
    counts) exactly that one."""
    n = 0
    with open_url(url, **(remote or {})) as stream:
        tar = _decompressed(stream, url)
        try:
            for _ in group_samples(tar_entries(tar, url, with_data=tar is not stream), url):
                n += 1
        except ShardError:
            n += 1
    return n


# -- reading a piece of a shard under the error policy -----------------------------------
Piece = tuple  # (url, start, stop | None, copy): samples [start, stop) of a shard


def _lost(url: str, start: int, stop: int | None, copy: int, skip: Skip) -> Iterator[tuple[Origin, Skip]]:
    """The rest of a piece that cannot be read: one skip per sample when the count is
    known (so batch boundaries stay put), else one for the whole rest."""
    for index in range(start, start + 1 if stop is None else stop):
        yield (url, index, copy), skip


def read_piece(piece: Piece, policy: str, remote: dict | None = None) -> Iterator[tuple[Origin, dict | Skip]]:
    """``(origin, sample)`` for each sample of the piece; under ``skip``/``warn`` a bad
    sample becomes a :class:`Skip` in its place and a broken shard ends the piece."""
    url, start, stop, copy = piece
    try:
        stream = open_url(url, **(remote or {}))
    except Exception as exc:
        skip = skip_for(exc, url, f"shard {url}", policy, cause="unreadable shard")
        yield from _lost(url, start, stop, copy, skip)
        return
    index = -1
    try:
        members = tar_entries(_decompressed(stream, url), url)
        for index, (sample, error) in enumerate(group_samples(members, url)):
            if index < start:
                continue
            if stop is not None and index >= stop:
                return
            if error is not None:
                yield (url, index, copy), skip_for(error, url, f"sample {sample['__key__']!r}", policy)
            else:
                yield (url, index, copy), sample
        if stop is not None and index + 1 < stop:
            raise ShardError("shard shorter than its count",
                             f"{url}: {index + 1} samples, its manifest says {stop}")
        while stream.read(_CHUNK):  # to the end: a pipe: command's exit status is checked there
            pass
    except Exception as exc:  # the stream or the tar broke: the rest of the shard is lost
        skip = skip_for(exc, url, f"the rest of {url}", policy, cause=_shard_cause(exc))
        yield from _lost(url, max(start, index + 1), stop, copy, skip)
    finally:
        stream.close()


def _shard_cause(exc: Exception) -> str:
    return exc.cause if isinstance(exc, ShardError) else "unreadable shard"


# -- placement -------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def take(pieces: list[Piece], a: int, b: int) -> list[Piece]:
    """Positions ``[a, b)`` of the pieces' concatenated samples; past the end the sequence
    starts over, as a repeat (``copy`` + 1 per round): DistributedSampler's padding."""
    total = sum(p[2] - p[1] for p in pieces)
    out: list[Piece] = []
    if total == 0 or a >= b:
        return out
    for rnd in range(a // total, (b - 1) // total + 1):
        lo, hi, pos = a - rnd * total, b - rnd * total, 0
        for url, start, stop, copy in pieces:
            n = stop - start
            s, e = max(lo, pos), min(hi, pos + n)
            if s < e:
                out.append((url, start + s - pos, start + e - pos, copy + rnd))
            pos += n
    return out


def split_even(pieces: list[Piece], parts: int, part: int, policy: str) -> list[Piece]:
    """Part ``part`` of ``parts`` contiguous, equal shares of the pieces' samples.

    ``"repeat"``: every share has ``ceil(total / parts)``, the last ones completed with the
    first samples again; ``"drop"``: ``floor(total / parts)``, at most ``parts - 1`` samples
    left out (the last ones); ``"split"``: shares that differ by at most one, nothing added
    or left out (the split of one rank's share among its workers).
    """
    total = sum(p[2] - p[1] for p in pieces)
    if policy == "split":
        q, r = divmod(total, parts)
        a = part * q + min(part, r)
        return take(pieces, a, a + q + (part < r))
    q = -(-total // parts) if policy == "repeat" else total // parts
    return take(pieces, part * q, (part + 1) * q)


def remaining(pieces: list[Piece], progress: Progress) -> list[Piece]:
    """The pieces less what ``progress`` says was delivered (repeats are never owed)."""
    return [(url, a, b, 0) for url, start, stop, copy in pieces if copy == 0
            for a, b in progress.done(url).gaps(start, stop)]


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A bounded shuffle: fill ``size`` items, then emit a random one per new arrival."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
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


def _remote_manifest(urls: list[str]) -> dict | None:
    from .remote import find_remote_manifest  # fetched over fsspec: see fastload.remote

    return find_remote_manifest(urls)


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


_EVEN = ("repeat", "drop", None)


class ShardDataset(IterableDataset):
    """A torch IterableDataset over WebDataset tar shards yielding raw sample dicts
    (or ``transform(sample)``, run inside the worker).

    Each epoch's shard order is shuffled by ``(seed, epoch)``; ``shuffle=N`` adds a bounded
    sample shuffle buffer per worker. Samples are split across DDP ranks and DataLoader
    workers so that each is read once per epoch. With several ranks, ``even_ranks`` makes
    every rank read the same number of samples (and its workers equal shares of them), so
    every rank yields the same number of batches and none waits in a collective forever:
    ``"repeat"`` (default, as ``DistributedSampler``) completes the last ranks' shares with
    the epoch's first samples, ``"drop"`` leaves out at most ``world_size - 1`` samples
    (the epoch's last); ``None`` deals whole shards (``urls[rank::world]``), uneven.
    Evening needs each shard's sample count: from ``PREFIX.manifest.json`` when present,
    else read from the tar headers once.

    ``on_error`` (default: the loader's) decides what a bad sample or shard costs; see
    :mod:`fastload.errors`. Remote shards (s3://, gs://, http(s)://, hf://) stream with
    read-ahead and retries; ``cache_dir`` keeps whole shards on local disk for later epochs,
    at most ``cache_limit`` bytes, shared safely by workers and ranks (:mod:`fastload.remote`).
    """

    def __init__(self, urls: str | Iterable[str], *, shuffle: int = 0, seed: int = 0,
                 resampled: bool = False, transform: Callable | None = None,
                 on_error: str | None = None, even_ranks: str | None = "repeat",
                 cache_dir: str | None = None, cache_limit: int | None = None):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards match {urls!r}")
        if even_ranks not in _EVEN:
            raise ValueError(f"even_ranks must be one of {_EVEN}, got {even_ranks!r}")
        self.shuffle, self.seed, self.resampled = shuffle, seed, resampled
        self.transform, self.on_error = transform, check_policy(on_error)
        self.even_ranks = even_ranks
        self.remote = {"cache_dir": cache_dir, "cache_limit": cache_limit}  # see fastload.remote
        self.epoch = 0
        self.skipped = 0  # skips seen by plain iteration (the loader counts its own)
        self._warned_idle = False
        manifest = find_manifest(self.urls) or _remote_manifest(self.urls)
        self._counts = self._manifest_counts(manifest) if manifest else None

    def _manifest_counts(self, manifest: dict) -> dict[str, int] | None:
        by_name = {s["name"]: s["samples"] for s in manifest.get("shards", [])}
        counts = {u: by_name.get(os.path.basename(u)) for u in self.urls}
        return counts if all(v is not None for v in counts.values()) else None

    def counts(self) -> dict[str, int]:
        """Samples per shard: the manifest's, else counted from the tar headers (once)."""
        if self._counts is None:
            self._counts = {u: count_samples(u, self.remote) for u in self.urls}
        return self._counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fingerprint(self) -> dict:
        """What a saved position depends on: resuming into another dataset is refused."""
        digest = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]
        return {"urls": digest, "shards": len(self.urls), "seed": self.seed, "shuffle": self.shuffle,
                "even_ranks": self.even_ranks, "resampled": self.resampled}

    def epoch_shards(self) -> list[str]:
        """Every shard, in this epoch's reading order."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(urls)
        return urls

    def _even(self, world: int) -> str | None:
        return self.even_ranks if world > 1 and not self.resampled else None

    def _rank_part(self, pieces: list[Piece], rank: int, world: int) -> list[Piece]:
        even = self._even(world)
        return split_even(pieces, world, rank, even) if even else pieces[rank::world]

    def _worker_part(self, pieces: list[Piece], world: int) -> list[Piece]:
        worker, workers = worker_and_count()
        if len(pieces) < workers and worker == 0 and not self._warned_idle and not self._even(world):
            self._warned_idle = True
            warnings.warn(f"fastload: {len(pieces)} shards for {workers} workers of this rank: "
                          "some workers get no shard and sit idle", stacklevel=3)
        if self._even(world):
            return split_even(pieces, workers, worker, "split")
        return pieces[worker::workers]

    def pieces(self, resume: dict | None = None) -> list[Piece]:
        """This rank's and worker's share of the epoch, as pieces of shards, in reading order.

        ``resume`` (from the loader) with ``mode="rank"`` deals out again what this rank had
        left (another worker count); ``mode="all"`` what all ranks had left (another world
        size). Both need exact shard counts; ``mode="exact"`` replays the same share.
        """
        rank, world = rank_and_world()
        mode = resume["mode"] if resume else "exact"
        need_counts = self._even(world) or mode != "exact"
        counts = self.counts() if need_counts else (self._counts or {})  # known: broken shards count exactly
        full = [(u, 0, counts.get(u), 0) for u in self.epoch_shards()]
        if mode == "exact":
            mine = self._rank_part(full, rank, world)
        else:
            progress = Progress.from_states(*resume["progress"])
            if mode == "rank":
                mine = remaining(self._rank_part(full, rank, world), progress)
            else:
                mine = self._rank_part(remaining(full, progress), rank, world)
        return self._worker_part(mine, world)

    def _rng(self, stream: str) -> random.Random:
        rank, _ = rank_and_world()
        worker, _ = worker_and_count()
        return random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}/{stream}")

    def _raw(self, pieces: list[Piece], policy: str) -> Iterator[tuple[Origin, dict | Skip]]:
        if self.resampled:
            rng = self._rng("resample")
            pieces = ((rng.choice(self.urls), 0, None, 0) for _ in iter(int, 1))
        from .remote import read_ahead  # starts the next remote shard's download early

        events = (event for piece in read_ahead(pieces, self.remote)
                  for event in read_piece(piece, policy, self.remote))
        if self.shuffle:
            events = shuffle_buffer(events, self.shuffle, self._rng("samples"))
        return events

    def stream(self, on_error: str | None = None, resume: dict | None = None, defer: bool = False
               ) -> Iterator[tuple[Origin, object]]:
        """``(origin, item)`` for every sample of this worker's share, where ``item`` is the
        transformed sample or a :class:`~fastload.errors.Skip` in its place.

        The loader reads this rather than ``iter()``: origins are what its resume state
        records, and skips keep their place so that batch boundaries do not move. With an
        ``exact`` resume the same stream is replayed (tar reading only) and what was
        delivered is left out after the shuffle buffer, so the rest comes in the same order.
        ``defer``: the loader will write the batch into its own buffer, so a transform with a
        ``deferred`` method is called through it (write requests instead of pixel tensors,
        see :mod:`fastload.deferred`).
        """
        policy = resolve(self.on_error, on_error)
        yield from self.transformed(self.raw_stream(policy, resume), policy, defer)

    def raw_stream(self, policy: str, resume: dict | None = None) -> Iterator[tuple[Origin, dict | Skip]]:
        """:meth:`stream` before the transform: where a stage that regroups raw samples
        (``fastload.budget.TokenBatches``) goes."""
        events = self._raw(self.pieces(resume), policy)
        if resume is not None and resume["mode"] == "exact":
            done = Progress.from_states(*resume["progress"])
            events = (event for event in events if event[0] not in done)
        yield from events

    def transformed(self, events: Iterable[tuple[Origin, dict | Skip]], policy: str, defer: bool = False
                    ) -> Iterator[tuple[Origin, object]]:
        """The transform applied to raw events under ``policy`` (a failure becomes a Skip)."""
        transform = getattr(self.transform, "deferred", self.transform) if defer else self.transform
        for origin, item in events:
            if isinstance(item, Skip) or transform is None:
                yield origin, item
                continue
            try:
                out = transform(item)
            except Exception as exc:
                out = skip_for(exc, origin[0], f"sample {item['__key__']!r} of {origin[0]}", policy)
            yield origin, Skip("filtered by transform", origin[0]) if out is None else out

    def __iter__(self) -> Iterator:
        for _, item in self.stream():
            if isinstance(item, Skip):
                self.skipped += 1
            else:
                yield item

    def __len__(self) -> int:
        if self.resampled:
            raise TypeError("a resampled ShardDataset has no length")
        if self._counts is None and not all(_is_local(u) for u in self.urls):
            raise TypeError("len() of remote shards needs their manifest (PREFIX.manifest.json)")
        rank, world = rank_and_world()
        counts = self.counts()
        full = [(u, 0, counts[u], 0) for u in self.epoch_shards()]
        return sum(b - a for _, a, b, _ in self._rank_part(full, rank, world))
