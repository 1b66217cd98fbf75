"""Video bytes -> the frames the model will see, decoding no frame it will not.

Containers are read with PyAV (its wheels bundle FFmpeg, so nothing is needed on the system;
torchcodec's PyPI wheels need a CUDA build of torch and the system's FFmpeg: see
``benchmarks/RESULTS.md``). Three steps, each bounded:

- :func:`sniff_container` names the container from its first bytes (what ``fastload-shard``
  stores the bytes under).
- :func:`probe` reads the container's packets, decoding only the first frame (a few ms for a
  minute of video): frame count, frame rate, size, display rotation, and every frame's
  presentation time. The frame count
  is the count of packets the demuxer hands out, not what the header claims, so a container
  that lies (10^9 frames, a missing count in WebM/Matroska) still gives the count the decode
  will meet; token counts come from here, before any frame is decoded.
- :func:`decode_frames` seeks to the keyframe before each sampled frame (when that skips
  decoding) and decodes forward to it; frames after the last sampled one are never decoded,
  and only sampled frames are converted to RGB. Frame ``i`` is the ``i``-th frame in
  presentation order, as transformers' PyAV loader (``read_video_pyav``) counts it, and its RGB
  is PyAV's ``to_ndarray(format="rgb24")``, the same conversion that loader makes.

Every failure is a :class:`VideoDecodeError` (a ``ValueError``): a container that does not
open, no video stream, no frame rate, too few frames, a truncated or corrupt stream, an
unsupported codec, or a decode past its time limit.
"""
from __future__ import annotations

import bisect
import gc
import io
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

#: Container name -> the extension a shard member gets.
VIDEO_EXTENSIONS = {"mp4": "mp4", "mov": "mov", "3gp": "3gp", "avi": "avi", "webm": "webm", "mkv": "mkv",
                    "flv": "flv", "ogg": "ogv", "mpegts": "ts", "mpeg": "mpg"}
_VIDEO_KEY = re.compile(r"^(?:(\d+)\.)?(" + "|".join(sorted(set(VIDEO_EXTENSIONS.values()))) + r"|m4v|mpeg)$")

#: A decode that runs longer than this many seconds fails (checked between packets), so a
#: pathological stream costs one sample, not the worker; ``FASTLOAD_VIDEO_TIMEOUT`` sets it
#: for every worker process.
DECODE_TIMEOUT = float(os.environ.get("FASTLOAD_VIDEO_TIMEOUT", "120"))

# A decoder that ran FFmpeg threads frees them when it is deallocated, waiting for them; in a forked
# child those threads do not exist, so a context inherited in a reference cycle and collected there
# (PyAV containers hold cycles; transformers' PyAV loader never closes its container) hangs the child
# forever. Collecting before every fork frees such contexts in the parent, where their threads are.
os.register_at_fork(before=gc.collect)

#: Most packets a probe reads: a million frames is 9 hours at 30 fps; past it the video fails
#: instead of growing the frame table without bound.
MAX_PROBE_FRAMES = 1_000_000


class VideoDecodeError(ValueError):
    """A video that cannot be probed or decoded; the message names the problem."""


def sniff_container(data: bytes) -> str | None:
    """The container of ``data`` from its first bytes (a key of :data:`VIDEO_EXTENSIONS`), or None."""
    head = bytes(data[:64])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "mov" if brand == b"qt  " else "3gp" if brand.startswith(b"3g") else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mov"  # QuickTime without a file-type box
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the DocType says WebM or Matroska
        return "webm" if b"webm" in head else "mkv"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:
        return "mpegts"
    return None


def sample_videos(sample: dict) -> list:
    """Video members of a shard sample in placeholder order (``mp4``, or ``0.mp4``, ``1.avi``, ...)."""
    found = []
    for key, value in sample.items():
        m = _VIDEO_KEY.match(key)
        if m:
            found.append((int(m.group(1) or 0), value))
    return [v for _, v in sorted(found, key=lambda kv: kv[0])]


@dataclass(frozen=True)
class VideoInfo:
    """What a container says about its first video stream, from its packets alone.

    ``frame_pts`` holds every frame's presentation timestamp in presentation order (stream
    time base) and ``key_pts`` the keyframes'; None when the packets carry no usable
    timestamps, in which case decoding counts frames from the start instead of seeking.
    ``header_frames`` and ``header_seconds`` are what the header claims (0 and None where it
    is silent): LLaMA-Factory samples from them (:class:`fastload.llamafactory.LlamaFactoryVideos`).
    ``rotation`` is the display matrix's counter-clockwise turn (0, 90, 180 or 270) that shows
    the stored frames (``width`` x ``height``) upright, read from the first decoded frame."""

    container: str | None
    codec: str
    width: int
    height: int
    frames: int
    fps: float
    duration: float
    nbytes: int
    frame_pts: tuple[int, ...] | None = None
    key_pts: tuple[int, ...] | None = None
    header_frames: int = 0
    header_seconds: float | None = None
    rotation: int = 0

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as displayed: a quarter turn swaps them."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


def _open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoDecodeError(f"not a readable video container: {exc}") from exc


def _video_stream(container):
    if not container.streams.video:
        raise VideoDecodeError("the container has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoDecodeError(f"no decoder for the video's codec (tag {getattr(stream, 'codec_tag', None)!r})")
    return stream


def _timeline(container, stream) -> tuple[int, tuple[int, ...] | None, tuple[int, ...] | None, int]:
    """(frame count, sorted frame pts, sorted keyframe pts, rotation) from the demuxed packets;
    packets are decoded one by one, each on its own, until one gives a frame: its display
    rotation is the stream's."""
    import av

    pts, keys, count, usable, rotation = [], [], 0, True, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue  # the flush packet at the end; frames an edit list cuts
            count += 1
            if count > MAX_PROBE_FRAMES:
                raise VideoDecodeError(f"more than {MAX_PROBE_FRAMES} frames")
            if rotation is None:  # this packet alone, drained: one frame decoded, not the reorder delay's worth
                rotation = _rotation([*packet.decode(), *stream.codec_context.decode(None)])
                stream.codec_context.flush_buffers()
            if packet.pts is None:
                usable = False
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"corrupt or truncated container: {exc}") from exc
    if not usable or len(set(pts)) != len(pts):
        return count, None, None, rotation or 0
    return count, tuple(sorted(pts)), tuple(sorted(keys)), rotation or 0


def _rotation(frames) -> int | None:
    """The first frame's display rotation, counter-clockwise, to the nearest quarter turn in
    [0, 360) (torchcodec rounds it so too); None without a frame."""
    for frame in frames:
        return round((frame.rotation or 0) / 90) % 4 * 90
    return None


def probe(data: bytes) -> VideoInfo:
    """The video's :class:`VideoInfo`, decoding no frame but the first (for its rotation). The frame rate is the stream's
    average rate (transformers' PyAV loader reads the same), the frame count the demuxed
    packets'. Fails on no video stream, no frame rate, no frames or a zero size."""
    from .header import as_bytes

    data = as_bytes(data)
    with _open(data) as container:
        stream = _video_stream(container)
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            raise VideoDecodeError("the video stream has no frame rate")
        if not (ctx.width > 0 and ctx.height > 0):
            raise VideoDecodeError(f"the video stream has no frame size ({ctx.width}x{ctx.height})")
        _configure(stream, 1)
        frames, frame_pts, key_pts, rotation = _timeline(container, stream)
        if frames == 0:
            raise VideoDecodeError("the video stream has no frames")
        seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        return VideoInfo(container=sniff_container(data), codec=ctx.name, width=ctx.width, height=ctx.height,
                         frames=frames, fps=fps, duration=frames / fps, nbytes=len(data),
                         frame_pts=frame_pts, key_pts=key_pts, header_frames=stream.frames or 0,
                         header_seconds=seconds, rotation=rotation)


class _Deadline:
    """Raises once ``seconds`` have passed: a decode is bounded in time, not only in frames."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.seconds = seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise VideoDecodeError(f"decoding took longer than {self.seconds:g} s")


def _configure(stream, threads: int) -> None:
    ctx = stream.codec_context
    ctx.thread_count = threads
    ctx.thread_type = "AUTO" if threads != 1 else "SLICE"


def _frames_seeking(container, stream, info: VideoInfo, wanted: list[int], deadline: _Deadline,
                    skip: bool) -> Iterator:
    """(index, frame) for each wanted index, seeking to the keyframe before a target when that
    keyframe lies past what was decoded so far (``skip``: non-reference frames not wanted are
    not decoded)."""
    targets = {info.frame_pts[i]: i for i in wanted}
    frames, decoded_up_to = None, None
    for pts in sorted(targets):
        before = bisect.bisect_right(info.key_pts, pts) - 1
        key = info.key_pts[before] if before >= 0 else None
        if frames is None or (key is not None and key > decoded_up_to):
            container.seek(key if key is not None else pts, stream=stream, backward=True, any_frame=False)
            # one iterator from here on: a packet may give several frames
            frames = _decode(container, stream, deadline, set(targets) if skip else None)
        for frame in frames:
            if frame.pts is None:
                raise VideoDecodeError("a decoded frame has no timestamp")
            decoded_up_to = frame.pts
            if frame.pts == pts:
                yield targets[pts], frame
                break
            if frame.pts > pts:
                raise _Missing(f"frame {targets[pts]} (pts {pts}) is missing from the stream")
        else:
            raise _Missing(f"the stream ends before frame {targets[pts]}: truncated?")


def _frames_counting(container, stream, wanted: list[int], deadline: _Deadline) -> Iterator:
    """(index, frame) for each wanted index, counting decoded frames from the start (as
    transformers' PyAV loader does): for streams whose packets carry no usable timestamps."""
    wanted_set, last = set(wanted), max(wanted)
    index = -1
    for index, frame in enumerate(_decode(container, stream, deadline)):
        if index in wanted_set:
            yield index, frame
        if index >= last:
            return
    raise VideoDecodeError(f"the stream ends after {index + 1} frames, before frame {last}: truncated?")


def _decode(container, stream, deadline: _Deadline, keep: set | None = None) -> Iterator:
    """Decoded frames from the container's position on. With ``keep`` (the pts of the frames
    wanted), the decoder skips every other non-reference frame: nothing refers to those, so
    the frames it still decodes are the same, and in B-frame-heavy streams most frames go."""
    import av

    ctx = stream.codec_context
    try:
        for packet in container.demux(stream):
            deadline.check()
            if keep is not None:
                ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in keep else "NONREF"
            yield from packet.decode()
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"corrupt video stream: {exc}") from exc


def decode_frames(data: bytes, info: VideoInfo, indices, convert: Callable, *, threads: int = 1,
                  timeout: float | None = None) -> list:
    """``convert(frame)`` for each frame in ``indices`` (presentation order, repeats allowed),
    decoding only up to the last one and seeking past stretches that need no decoding.

    ``threads`` is FFmpeg's decoder thread count (1 in loader workers: the workers are the
    parallelism); ``timeout`` bounds the wall time (default :data:`DECODE_TIMEOUT`)."""
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        return []
    if wanted[0] < 0 or wanted[-1] >= info.frames:
        raise VideoDecodeError(f"frame {wanted[-1]} asked of a video of {info.frames} frames")
    deadline = _Deadline(DECODE_TIMEOUT if timeout is None else timeout)
    try:
        out = _decode_wanted(data, info, wanted, convert, threads, deadline, skip=True)
    except _Missing:  # a decoder that skipped more than it should: once more, decoding every frame
        out = _decode_wanted(data, info, wanted, convert, threads, deadline, skip=False)
    return [out[int(i)] for i in indices]


class _Missing(VideoDecodeError):
    """A wanted frame did not come out of the decoder."""


def _decode_wanted(data: bytes, info: VideoInfo, wanted: list[int], convert: Callable, threads: int,
                   deadline: _Deadline, skip: bool) -> dict:
    import av

    out = {}
    with _open(data) as container:
        stream = _video_stream(container)
        try:
            _configure(stream, threads)
            frames = (_frames_seeking(container, stream, info, wanted, deadline, skip) if info.frame_pts
                      else _frames_counting(container, stream, wanted, deadline))
            for index, frame in frames:
                out[index] = convert(frame)
        except av.FFmpegError as exc:
            raise VideoDecodeError(f"cannot decode the video: {exc}") from exc
    return out


def decode_all(data: bytes, *, timeout: float | None = None) -> int:
    """Decodes every frame (``fastload-shard --validate``); returns how many there were."""
    deadline = _Deadline(DECODE_TIMEOUT if timeout is None else timeout)
    with _open(data) as container:
        stream = _video_stream(container)
        _configure(stream, 1)
        return sum(1 for _ in _decode(container, stream, deadline))


def rgb24(frame) -> np.ndarray:
    """The frame as (h, w, 3) uint8 RGB: transformers' PyAV loader's conversion."""
    return frame.to_ndarray(format="rgb24")


def shard_member(data: bytes, name: str, validate: bool) -> tuple[str, tuple]:
    """(member extension, stats info) of a video for ``fastload-shard``: its container sniffed
    from the bytes, its metadata probed (a video the loader could not probe is refused here),
    and with ``validate`` every frame decoded. The info is ``(container, width, height, bytes,
    frames, duration)``."""
    container = sniff_container(data)
    if container is None:
        raise VideoDecodeError(f"video {name!r} is not a recognised video container")
    try:
        info = probe(data)
        decoded = decode_all(data) if validate else info.frames
    except VideoDecodeError as exc:
        raise VideoDecodeError(f"video {name!r}: {exc}") from exc
    if decoded < info.frames:
        raise VideoDecodeError(f"video {name!r}: {decoded} of its {info.frames} frames decode")
    return VIDEO_EXTENSIONS[container], (container, info.width, info.height, len(data), info.frames,
                                         round(info.duration, 3))
