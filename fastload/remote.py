"""Remote shards (s3://, gs://, http(s)://, hf://, any fsspec url): sequential streaming with
read-ahead, retries with backoff, and an optional bounded cache of whole shards.

Why it looks like this:

- **Sequential ranged reads.** A shard is fetched front to back in ``chunk``-byte range
  requests by a background thread that runs up to ``read_ahead`` bytes ahead of the tar
  reader, so the download overlaps decoding. A failed range is fetched again from the same
  offset, so a dropped connection costs one chunk, not the shard.
- **Read-ahead across shards.** :func:`read_ahead` (the hook ShardDataset puts around its
  pieces) starts the next shard's download while the current one is being decoded, so a
  worker does not wait a round trip (and a chunk) at every shard boundary.
- **Errors keep the loader's policy.** Transient faults (connection reset, dropped or short
  response, 5xx, throttling) are retried ``retries`` times with exponential backoff. Past
  that, a shard that fails before its first chunk raises from :func:`open_remote` (the
  loader's "unreadable shard"), one that fails later raises :class:`~fastload.shards.ShardError`
  inside the stream (the rest of that shard is skipped and counted, or raised).
- **A cache that is safe to share.** Whole shards are written under a temporary ``.part``
  name and renamed once every byte has arrived, so a file under its final name is always
  complete. Space is reserved (and least recently used shards evicted) under a lock file
  before a download starts, so the directory never holds more than ``cache_limit`` bytes,
  whatever number of workers, ranks or jobs share it; a ``.part`` file is flock'ed by its
  writer, so one left by a killed process is recognised and removed.
- **No credentials in messages.** Credentials come from the backend's usual places
  (environment, config files, instance roles); urls in our messages are shown without
  user info and query strings (where pre-signed signatures live).

Tuning (environment, so that every worker process and rank sees the same values):
``FASTLOAD_REMOTE_RETRIES`` (5), ``FASTLOAD_REMOTE_BACKOFF`` (0.5 s, doubled per retry, at
most 16 s), ``FASTLOAD_REMOTE_CHUNK`` (8 MiB), ``FASTLOAD_REMOTE_READ_AHEAD`` (64 MiB),
``FASTLOAD_REMOTE_TIMEOUT`` (120 s per request, for fsspec's async backends: http, s3, gcs).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .shards import ShardError

T = TypeVar("T")

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")
_URL_SECRETS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?:[^/@\s]*@)?(?P<rest>[^?#\s'\"]*)(?:[?#][^\s'\"]*)?",
                          re.IGNORECASE)


def is_remote(url: str) -> bool:
    """True for urls that go through fsspec (not local paths, ``file://`` or ``pipe:``)."""
    return bool(_SCHEME.match(url)) and not url.startswith("file://")


def redact(text: str) -> str:
    """``text`` with every url's user info and query string removed: what our messages may show."""
    return _URL_SECRETS.sub(lambda m: m.group("scheme") + m.group("rest"), text)


@dataclass(frozen=True)
class Settings:
    """Retry and buffering knobs, read from the environment (see the module docstring)."""

    retries: int = 5
    backoff: float = 0.5
    chunk: int = 8 << 20
    read_ahead: int = 64 << 20
    timeout: float = 120.0  # per request: a stalled connection is a fault to retry, not a hang

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(retries=int(env("FASTLOAD_REMOTE_RETRIES", cls.retries)),
                   backoff=float(env("FASTLOAD_REMOTE_BACKOFF", cls.backoff)),
                   chunk=max(1 << 12, int(env("FASTLOAD_REMOTE_CHUNK", cls.chunk))),
                   read_ahead=max(1 << 12, int(env("FASTLOAD_REMOTE_READ_AHEAD", cls.read_ahead))),
                   timeout=float(env("FASTLOAD_REMOTE_TIMEOUT", cls.timeout)))


class RemoteError(OSError):
    """A remote read that failed for good (its message is redacted); ``last`` is the type of
    the last fault."""

    def __init__(self, message: str, last: type = OSError):
        super().__init__(message)
        self.last = last


# -- which faults are worth another try ------------------------------------------------
_TRANSIENT_NAMES = ("Timeout", "Disconnect", "Connection", "Payload", "Throttl", "SlowDown",
                    "ServiceUnavailable", "InternalError", "EndpointConnection", "ReadError")


class _ShortRead(ConnectionError):
    """A response with fewer bytes than were asked for (a truncating server or proxy)."""


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a fault that another try may not hit:
    connection resets, dropped or short responses, timeouts, HTTP 5xx, 408 and 429."""
    seen = 0
    while exc is not None and seen < 8:
        status = _status(exc)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(name in type(exc).__name__ for name in _TRANSIENT_NAMES):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT,
                                                      errno.ECONNABORTED, errno.EAGAIN):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def with_retries(call: Callable[[], T], settings: Settings, what: str,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried again after transient faults with exponential backoff (and jitter, so
    that workers hit by the same outage do not come back in lockstep)."""
    for attempt in range(settings.retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == settings.retries or not is_transient(exc):
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise RemoteError(redact(f"{what}{tries}: {type(exc).__name__}: {exc}"), type(exc)) from None
            delay = min(16.0, settings.backoff * 2 ** attempt)
            sleep(delay * random.uniform(0.75, 1.25))
    raise AssertionError("unreachable")


# -- one remote object ---------------------------------------------------------------
class RemoteFile:
    """A remote object as its size and byte ranges, each call retried."""

    def __init__(self, url: str, settings: Settings):
        try:
            from fsspec.core import url_to_fs
        except ImportError as exc:
            raise ImportError(f"reading {redact(url)} needs fsspec and the protocol's package "
                              "(pip install 'fastload[remote]')") from exc
        self.url, self.settings, self.shown = url, settings, redact(url)
        self.fs, self.path = url_to_fs(url)
        self.whole: bytes | None = None  # the object, from a server that ignored a Range header
        # fsspec's async backends (http, s3, gcs) take a per-call timeout; others have their own
        self.call = {"timeout": settings.timeout} if getattr(self.fs, "async_impl", False) else {}

    def size(self) -> int | None:
        info = with_retries(lambda: self.fs.info(self.path, **self.call), self.settings, f"{self.shown}: info")
        size = info.get("size")
        return int(size) if size is not None else None

    def fetch(self, start: int, end: int, size: int) -> bytes:
        """Bytes ``[start, end)``; a short response counts as a transient fault."""
        def once() -> bytes:
            if self.whole is not None:
                return self.whole[start:end]
            data = self.fs.cat_file(self.path, start=start, end=end, **self.call)
            if len(data) == size and end - start != size:  # a server that ignores Range: keep it
                self.whole, data = data, data[start:end]
            if len(data) != end - start:
                raise _ShortRead(f"{len(data)} of {end - start} bytes at offset {start}")
            return data
        return with_retries(once, self.settings, f"{self.shown}: bytes {start}-{end} of {size}")

    def fetch_all(self) -> bytes:
        """The whole object, for servers that do not tell its size."""
        return with_retries(lambda: self.fs.cat_file(self.path, **self.call), self.settings,
                            f"{self.shown}: read")


# -- a byte-bounded hand-off between the download thread and the reader ----------------
class _Buffer:
    """Chunks in flight, at most ``limit`` bytes (one chunk always fits), then the end or an error."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0
        self.chunks: list[bytes] = []
        self.done, self.error, self.closed = False, None, False
        self.cond = threading.Condition()

    def put(self, data: bytes) -> bool:
        """False when the reader has gone (the download should stop)."""
        with self.cond:
            while self.bytes and self.bytes + len(data) > self.limit and not self.closed:
                self.cond.wait()
            if self.closed:
                return False
            self.chunks.append(data)
            self.bytes += len(data)
            self.cond.notify_all()
            return True

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()

    def get(self) -> bytes | None:
        """The next chunk; None at the end; raises the download's error in its place."""
        with self.cond:
            while not self.chunks and not self.done:
                self.cond.wait()
            if self.chunks:
                data = self.chunks.pop(0)
                self.bytes -= len(data)
                self.cond.notify_all()
                return data
            if self.error is not None:
                raise self.error
            return None

    def wait_ready(self) -> None:
        """Blocks until a first chunk, the end or an error is there."""
        with self.cond:
            while not self.chunks and not self.done:
                self.cond.wait()

    def failed_before_data(self) -> BaseException | None:
        with self.cond:
            return self.error if self.done and not self.chunks and self.error else None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.chunks.clear()
            self.bytes = 0
            self.cond.notify_all()


class Download(threading.Thread):
    """Fetches one shard front to back into a :class:`_Buffer` (and a cache entry, if any)."""

    def __init__(self, url: str, settings: Settings, cache: "Cache | None"):
        super().__init__(name="fastload-download", daemon=True)
        self.url, self.settings, self.cache = url, settings, cache
        self.buffer = _Buffer(settings.read_ahead)
        self.received = 0
        self.start()

    def run(self) -> None:
        entry = None
        try:
            remote = RemoteFile(self.url, self.settings)
            if self.buffer.closed:  # cancelled before it began (a read-ahead nobody needed)
                return
            size = remote.size()
            entry = self.cache.begin(self.url, size) if self.cache and size is not None else None
            for data in self._chunks(remote, size):
                if entry:
                    entry.write(data)
                if not self.buffer.put(data) and not self._finish_for_cache(entry, size):
                    return  # the reader closed early; ``finally`` drops the unfinished entry
            if entry:
                entry.commit()
            self.buffer.finish()
        except BaseException as exc:  # handed to the reader, which raises it in its thread
            self.buffer.finish(exc)
        finally:
            if entry:
                entry.abort()

    def _finish_for_cache(self, entry: "_Entry | None", size: int | None) -> bool:
        """After the reader closed: whether to fetch the rest anyway, for the cache. Worth it
        for the tail past the tar's end-of-archive blocks (at most a chunk), not for a shard
        whose reader only wanted its first samples."""
        return entry is not None and size is not None and size - self.received <= self.settings.chunk

    def _chunks(self, remote: RemoteFile, size: int | None) -> Iterator[bytes]:
        if size is None:
            yield remote.fetch_all()
            return
        for start in range(0, size, self.settings.chunk):
            end = min(size, start + self.settings.chunk)
            try:
                data = remote.fetch(start, end, size)
            except RemoteError as exc:
                if start == 0:
                    raise
                cause = "truncated shard" if issubclass(exc.last, _ShortRead) else "unreadable shard"
                raise ShardError(cause, str(exc)) from None
            self.received = end
            yield data

    def cancel(self) -> None:
        self.buffer.close()


class RemoteStream(io.RawIOBase):
    """The reader's side of a :class:`Download`: a sequential, non-seekable binary stream."""

    def __init__(self, download: Download):
        self.download = download
        self._chunk, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        parts, want = [], n
        while want > 0:
            if self._pos == len(self._chunk):
                data = self.download.buffer.get()
                if data is None:
                    break
                self._chunk, self._pos = data, 0
            piece = self._chunk[self._pos:self._pos + want]
            self._pos += len(piece)
            want -= len(piece)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(self.download.settings.chunk):
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.download.cancel()
        super().close()


# -- the shared shard cache ----------------------------------------------------------------
class _Entry:
    """A shard being written into the cache: ``.part`` file (flock'ed) renamed when complete."""

    def __init__(self, part: str, final: str, size: int, fd: int):
        self.part, self.final, self.size = part, final, size
        self.file = os.fdopen(fd, "wb")
        self.written = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.written += len(data)

    def commit(self) -> None:
        """Renames the file to its final name, once all ``size`` bytes are there."""
        if self.written != self.size:
            return
        self.file.flush()
        os.replace(self.part, self.final)
        self.file.close()

    def abort(self) -> None:
        """Drops an unfinished file (a no-op after :meth:`commit`)."""
        if self.file.closed:
            return
        self.file.close()
        try:
            os.remove(self.part)
        except FileNotFoundError:
            pass


class Cache:
    """Whole shards under ``root``, at most ``limit`` bytes on disk, least recently used evicted.

    The accounting counts complete shards by their size and ``.part`` files by the size their
    writer reserved (in the name), so the limit holds while downloads are in flight.
    """

    def __init__(self, root: str, limit: int | None):
        self.root, self.limit = root, limit
        os.makedirs(root, exist_ok=True)

    def name(self, url: str) -> str:
        """A file name per url: a hash (the url may be long or hold odd characters) and the
        shard's base name, so that a person can tell what is there."""
        base = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])[-80:]
        return f"{hashlib.sha256(url.encode()).hexdigest()[:20]}-{base}"

    def lookup(self, url: str):
        """An open file for a cached shard (marked as just used), or None."""
        path = os.path.join(self.root, self.name(url))
        try:
            f = open(path, "rb", buffering=1 << 20)
        except FileNotFoundError:
            return None
        try:
            os.utime(path)
        except FileNotFoundError:  # evicted meanwhile: the open file still reads whole
            pass
        return f

    def begin(self, url: str, size: int) -> _Entry | None:
        """Reserves ``size`` bytes for a new entry, evicting old ones; None when the shard
        does not fit the limit or another process is already fetching it (then the
        reader streams without caching rather than waiting)."""
        if self.limit is not None and size > self.limit:
            return None
        name = self.name(url)
        with self._locked():
            files = self._scan()
            if any(f[0] == "part" and f[1].startswith(name + ".") for f in files):
                return None
            if not self._make_room(files, size):
                return None
            part = os.path.join(self.root, f"{name}.{size}.{os.getpid()}-{random.getrandbits(32):08x}.part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return _Entry(part, os.path.join(self.root, name), size, fd)

    def used(self) -> int:
        """Bytes held or reserved now (what the limit bounds)."""
        with self._locked():
            return sum(f[3] for f in self._scan())

    def _locked(self):
        return _FileLock(os.path.join(self.root, ".lock"))

    def _scan(self) -> list[tuple[str, str, float, int]]:
        """(kind, name, mtime, bytes) of each entry; stale ``.part`` files are removed."""
        out = []
        for entry in os.scandir(self.root):
            if entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.endswith(".part"):
                if self._stale(entry.path):
                    _remove(entry.path)
                    continue
                reserved = int(entry.name.rsplit(".", 3)[-3])
                out.append(("part", entry.name, stat.st_mtime, max(reserved, stat.st_size)))
            else:
                out.append(("shard", entry.name, stat.st_mtime, stat.st_size))
        return out

    @staticmethod
    def _stale(path: str) -> bool:
        """A ``.part`` file whose writer is gone: nobody holds its lock."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _make_room(self, files: list, size: int) -> bool:
        if self.limit is None:
            return True
        used = sum(f[3] for f in files)
        for kind, name, _, nbytes in sorted((f for f in files if f[0] == "shard"), key=lambda f: f[2]):
            if used + size <= self.limit:
                break
            _remove(os.path.join(self.root, name))
            used -= nbytes
        return used + size <= self.limit


class _FileLock:
    """An exclusive flock on a file, as a context manager (held for a directory scan only)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the lock


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# -- the manifest beside remote shards ------------------------------------------------------------
def find_remote_manifest(urls: list[str]) -> dict | None:
    """``PREFIX.manifest.json`` beside remote ``PREFIX-000000.tar`` (one small request), when it
    is there: without it, the even DDP split would read every shard in every rank to count."""
    m = re.match(r"^(.*)-\d+\.tar$", urls[0]) if urls else None
    if not m or not is_remote(urls[0]):
        return None
    url = m.group(1) + ".manifest.json"
    try:
        source = RemoteFile(url, Settings.from_env())
        data = with_retries(lambda: source.fs.cat_file(source.path, **source.call), source.settings,
                            source.shown)
    except (RemoteError, ImportError):
        return None
    return json.loads(data)


# -- opening, with downloads started ahead of time ------------------------------------------------
_pending: dict[tuple, Download] = {}  # this process's read-ahead downloads, not yet opened
_pending_lock = threading.Lock()


def _key(url: str, cache_dir: str | None, cache_limit: int | None) -> tuple:
    return (url, cache_dir, cache_limit, os.getpid())


def _cache(cache_dir: str | None, cache_limit: int | None) -> Cache | None:
    if cache_dir is None:
        if cache_limit is not None:
            raise ValueError("cache_limit needs a cache_dir")
        return None
    return Cache(os.path.expanduser(cache_dir), cache_limit)


def open_remote(url: str, cache_dir: str | None = None, cache_limit: int | None = None):
    """A sequential binary stream over a remote shard: from the cache when it is there, else
    downloaded (in the background, ``read_ahead`` bytes ahead) and cached when it fits.

    Raises (for the loader's "unreadable shard") when not even the first chunk arrives.
    """
    cache = _cache(cache_dir, cache_limit)
    with _pending_lock:
        download = _pending.pop(_key(url, cache_dir, cache_limit), None)
    hit = cache.lookup(url) if cache is not None else None
    if hit is not None:
        if download is not None:
            download.cancel()
        return hit
    if download is None:
        download = Download(url, Settings.from_env(), cache)
    download.buffer.wait_ready()
    error = download.buffer.failed_before_data()
    if error is not None:
        raise error
    return RemoteStream(download)


def _prefetch(url: str, cache_dir: str | None, cache_limit: int | None) -> None:
    """Starts ``url``'s download now, unless it is cached or already under way."""
    key = _key(url, cache_dir, cache_limit)
    with _pending_lock:
        if key in _pending:
            return
    cache = _cache(cache_dir, cache_limit)
    if cache is not None and os.path.exists(os.path.join(cache.root, cache.name(url))):
        return
    download = Download(url, Settings.from_env(), cache)
    with _pending_lock:
        _pending[key] = download


def cancel_pending() -> None:
    """Cancels this process's read-ahead downloads that nobody opened. An iteration that ends
    normally does this itself; one abandoned by an exception does it when it is collected."""
    with _pending_lock:
        keys = list(_pending)
    _drop_pending(keys)


def _drop_pending(urls: Iterable[tuple]) -> None:
    with _pending_lock:
        for key in urls:
            download = _pending.pop(key, None)
            if download is not None:
                download.cancel()


def read_ahead(pieces: Iterable[tuple], remote: dict | None = None) -> Iterator[tuple]:
    """The pieces unchanged, starting the download of the next remote shard as each piece
    is handed out (so it overlaps that piece's decoding). Downloads never opened are
    cancelled when the iteration ends."""
    remote = remote or {}
    cache_dir, cache_limit = remote.get("cache_dir"), remote.get("cache_limit")
    started: list[tuple] = []

    def start(url: str) -> None:
        if is_remote(url):
            _prefetch(url, cache_dir, cache_limit)
            started.append(_key(url, cache_dir, cache_limit))
            del started[:-2]

    it = iter(pieces)
    current = next(it, None)
    try:
        while current is not None:
            following = next(it, None)
            start(current[0])  # first, so that it is first in line for bandwidth and cache space
            if following is not None and following[0] != current[0]:
                start(following[0])
            yield current
            current = following
    finally:
        _drop_pending(started)
