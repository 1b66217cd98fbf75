"""Shared-memory segments that carry batches from workers to the main process.

A worker owns a few *slots*; each slot is a segment the worker creates and maps once: an
anonymous ``memfd`` whose descriptor is handed to the main process over the worker's socket.
Nothing has a name, so no crash of any process can leak one (the kernel frees the memory
with the last mapping), and ``/dev/shm``'s size (docker's default is 64 MB) does not limit
it. Where memfd is missing or memory is short, a segment is a named file instead (in
``/dev/shm``, else :func:`fallback_dir`), which the main process unlinks as it maps it.
Batches are packed into a slot (tensors and arrays as raw bytes, write requests —
:mod:`fastload.deferred` — computed straight into it, everything else in a small pickled skeleton); the main process rebuilds them as zero-copy views, and the slot goes back
to its worker when the last view of the batch is garbage collected.
"""
from __future__ import annotations

import errno
import glob
import mmap
import os
import pickle
import secrets
import tempfile
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import recv_handle

import numpy as np
import torch

from ..deferred import is_request
from ..tree import map_tree

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
_ALIGN = 64


def new_loader_id() -> str:
    """A prefix unique to one loader iterator: every segment name starts with it."""
    return f"fastload-{os.getpid()}-{secrets.token_hex(4)}"


def segment_path(loader_id: str, worker: int, slot: int, generation: int) -> str:
    """Where a segment is first tried: ``SHM_DIR`` (``create_segment`` may move it elsewhere)."""
    return os.path.join(SHM_DIR, f"{loader_id}-w{worker}-s{slot}-g{generation}")


FALLBACK_ENV = "FASTLOAD_SHM_FALLBACK_DIR"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)


def fallback_dir() -> str:
    """Where segments go when ``/dev/shm`` is full (docker's default is 64 MB): a file-backed
    mapping in the page cache is slower than tmpfs, but a batch that arrives beats a dead worker."""
    return os.environ.get(FALLBACK_ENV) or tempfile.gettempdir()


MEMFD = "memfd:"  # the prefix of a memfd segment's name; its descriptor follows its message


def is_fallback(path: str) -> bool:
    """True for a segment that ``create_segment`` had to place in a file outside ``SHM_DIR``."""
    return not path.startswith(MEMFD) and os.path.dirname(path) != SHM_DIR


@dataclass
class Segment:
    """A worker's mapped segment: ``fd`` is a memfd still to be handed over (else None)."""

    path: str
    size: int
    buf: mmap.mmap
    fd: int | None = None

    def discard(self) -> None:
        """Frees a segment the main process never received."""
        try:
            self.buf.close()
        except BufferError:
            pass  # a view is still referenced (by the failing call's traceback): freed with it
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        else:
            os.unlink(self.path)


def _memfd(name: str, size: int) -> Segment:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)  # short of memory: an error now, not SIGBUS later
        return Segment(MEMFD + name, size, mmap.mmap(fd, size), fd)
    except BaseException:
        os.close(fd)
        raise


def new_segment(path: str, size: int, min_size: int | None = None) -> Segment:
    """A segment of ``size`` bytes (or ``min_size`` when memory is short): a memfd where the
    platform has one, else a named file (:func:`create_segment`)."""
    if hasattr(os, "memfd_create"):
        for attempt in ([size] if min_size is None or min_size >= size else [size, min_size]):
            try:
                return _memfd(os.path.basename(path), attempt)
            except OSError as exc:
                if exc.errno not in _FULL + (errno.ENOMEM,):
                    raise
    return Segment(*create_segment(path, size, min_size))


def unlink_matching(loader_id: str, worker: int | None = None) -> None:
    """Removes whatever names of this loader (or one of its workers) still exist, in
    ``SHM_DIR`` and in the fallback directory."""
    pattern = f"{loader_id}-w{worker}-*" if worker is not None else f"{loader_id}-*"
    for folder in dict.fromkeys((SHM_DIR, fallback_dir())):
        for path in glob.glob(os.path.join(folder, pattern)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _reserve(path: str, size: int) -> mmap.mmap:
    """Creates ``path`` with all ``size`` bytes allocated, then maps it.

    ``ftruncate`` alone makes a sparse file: on a full tmpfs the process would die of SIGBUS
    when it first touches a page. ``posix_fallocate`` turns that into ENOSPC here. On any
    failure the name is removed, which also frees whatever pages were already allocated.
    """
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            os.ftruncate(fd, size)  # a filesystem that cannot reserve: sizing is all we can do
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def create_segment(path: str, size: int, min_size: int | None = None) -> tuple[str, int, mmap.mmap]:
    """Creates and maps a segment of ``size`` bytes; returns ``(path, size, mapping)``.

    When ``SHM_DIR`` is full it first tries ``min_size`` there (a slot's growth headroom is
    optional), then ``size`` in :func:`fallback_dir` under the same name, so the main process
    (which receives the path) maps and unlinks it exactly as it does ``/dev/shm`` segments.
    """
    sizes = [size] if min_size is None or min_size >= size else [size, min_size]
    for attempt in sizes:
        try:
            return path, attempt, _reserve(path, attempt)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
    spill = os.path.join(fallback_dir(), os.path.basename(path))
    if spill == path:
        raise OSError(errno.ENOSPC, f"fastload: no room for a {size}-byte batch segment", path)
    try:
        return spill, size, _reserve(spill, size)
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        raise OSError(exc.errno, f"fastload: no room for a {size}-byte batch segment in {SHM_DIR} "
                                 f"nor in {fallback_dir()} (set {FALLBACK_ENV} to a larger disk)",
                      spill) from exc


def _receive_fd(conn) -> int:
    """The memfd a worker sent. The kernel drops a descriptor that would exceed the open-files
    limit (Python then reports missing ancillary data): that is EMFILE."""
    try:
        return recv_handle(conn)
    except RuntimeError as exc:
        raise OSError(errno.EMFILE, f"a segment's descriptor was dropped on receipt ({exc})") from exc


def attach_segment(path: str, size: int, conn=None) -> mmap.mmap:
    """Maps a worker's segment: a memfd received on ``conn``, or a named file whose name is
    unlinked at once. Either way the mapping alone keeps the memory alive.

    Each mapping holds a file descriptor (``mmap`` dups it), so many workers x slots can hit
    the open-files limit; that becomes an error saying what to change, as torch's does.
    """
    try:
        fd = _receive_fd(conn) if path.startswith(MEMFD) else os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        raise RuntimeError(
            f"fastload: too many open files while mapping a batch segment ({exc}). Each worker "
            "slot, and each batch the trainer keeps beyond them, holds one file descriptor in the "
            "main process: raise the limit with `ulimit -n` (e.g. `ulimit -n 65536`), keep fewer "
            "batches alive, or use fewer workers or a smaller shm_slots (torch's advice, "
            "torch.multiprocessing.set_sharing_strategy('file_system'), does not apply: fastload "
            "does not use torch's sharing strategies).") from exc
    finally:
        if not path.startswith(MEMFD):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# -- packing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    """Where a tensor or array lives in the segment."""

    offset: int
    nbytes: int
    dtype: object  # torch.dtype or numpy dtype
    shape: tuple
    is_tensor: bool


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _is_plain_tensor(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.layout == torch.strided and not x.is_nested and not x.is_quantized


def _is_buffer(x) -> bool:
    """Leaves that travel as raw bytes; any other tensor (nested, sparse, quantized) travels
    inside the pickled skeleton, as torch's own transport would carry it."""
    if isinstance(x, torch.Tensor):
        return _is_plain_tensor(x)
    return is_request(x) or (isinstance(x, np.ndarray) and x.dtype != object)


def _write(x, buf, offset: int) -> None:
    if not x.nbytes:
        return
    dst = _byte_view(buf, offset, x.nbytes).view(x.dtype if isinstance(x.dtype, torch.dtype) else torch.uint8)
    if is_request(x):  # e.g. the kernel writes a batch's patches here directly (fastload.deferred)
        x.write_into(dst.view(x.shape))
        return
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)).reshape(-1).view(torch.uint8)
    dst.view(t.shape).copy_(t)


def _buffers(batch) -> list:
    found: list = []
    map_tree(batch, _is_buffer, found.append)
    return found


def packed_size(batch) -> int:
    return sum(_aligned(x.nbytes) for x in _buffers(batch))


def _byte_view(buf, offset: int, nbytes: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, np.uint8, count=nbytes, offset=offset))


def pack(batch, buf: mmap.mmap) -> bytes:
    """Copies the batch's tensors/arrays into ``buf``; returns the pickled skeleton."""
    refs, offset = [], 0
    for x in _buffers(batch):
        _write(x, buf, offset)
        refs.append(_Ref(offset, x.nbytes, x.dtype, tuple(x.shape), not isinstance(x, np.ndarray)))
        offset += _aligned(x.nbytes)
    it = iter(refs)
    skeleton = map_tree(batch, _is_buffer, lambda _: next(it))
    return pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)


def _view(ref: _Ref, root: np.ndarray):
    raw = root[ref.offset: ref.offset + ref.nbytes]
    if ref.is_tensor:
        return torch.from_numpy(raw).view(ref.dtype).view(ref.shape)
    return raw.view(ref.dtype).reshape(ref.shape)


def unpack(skeleton: bytes, buf: mmap.mmap, size: int, on_release) -> object:
    """Rebuilds a batch as views of ``buf``; ``on_release()`` runs once no view is alive."""
    root = np.frombuffer(buf, np.uint8, count=size)
    batch = map_tree(pickle.loads(skeleton), lambda o: isinstance(o, _Ref), lambda ref: _view(ref, root))
    weakref.finalize(root, on_release)
    return batch
