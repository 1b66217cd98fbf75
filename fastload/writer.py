"""Writing WebDataset shards: size-capped tars, atomic renames, and a manifest.

A shard is written as ``NAME.tar.tmp`` and renamed when complete, so an interrupted run
never leaves a shard that looks whole; the manifest is written last, for the same reason.
"""
from __future__ import annotations

import glob
import io
import json
import os
import statistics
import tarfile
from dataclasses import dataclass, field


def _describe(values: list) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 1),
            "median": statistics.median(values)}


@dataclass
class VideoStats:
    """Count, containers, size, frame count and duration statistics of the videos written."""

    formats: dict = field(default_factory=dict)
    values: dict = field(default_factory=lambda: {k: [] for k in ("width", "height", "bytes", "frames", "duration")})

    def add(self, fmt: str, width: int, height: int, nbytes: int, frames: int, duration: float) -> None:
        self.formats[fmt] = self.formats.get(fmt, 0) + 1
        for key, value in zip(self.values, (width, height, nbytes, frames, duration)):
            self.values[key].append(value)

    def summary(self) -> dict:
        return {"count": len(self.values["bytes"]), "formats": self.formats,
                **{key: _describe(values) for key, values in self.values.items()}}


@dataclass
class ImageStats:
    """Count, formats and size statistics of the images written; an info with ``frames`` and
    ``duration`` is a video's, kept apart in ``videos``."""

    formats: dict = field(default_factory=dict)
    widths: list = field(default_factory=list)
    heights: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    videos: VideoStats = field(default_factory=VideoStats)

    def add(self, fmt: str, width: int, height: int, nbytes: int, frames: int | None = None,
            duration: float | None = None) -> None:
        if frames is not None:
            self.videos.add(fmt, width, height, nbytes, frames, duration)
            return
        self.formats[fmt] = self.formats.get(fmt, 0) + 1
        self.widths.append(width)
        self.heights.append(height)
        self.sizes.append(nbytes)

    def summary(self) -> dict:
        return {"count": len(self.sizes), "formats": self.formats, "width": _describe(self.widths),
                "height": _describe(self.heights), "bytes": _describe(self.sizes)}


class ShardWriter:
    """Writes samples (dicts of member extension -> bytes) into ``PREFIX-000000.tar``, ...

    A new shard starts when the current one would exceed ``maxcount`` samples or
    ``maxsize`` bytes.
    """

    def __init__(self, prefix: str, maxcount: int = 10_000, maxsize: int = 1 << 30):
        self.prefix, self.maxcount, self.maxsize = prefix, maxcount, maxsize
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._size = 0

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._path = self._name(len(self.shards))
        self._tar = tarfile.open(self._path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._path + ".tmp", self._path)
        self.shards.append({"name": os.path.basename(self._path), "samples": self._count,
                            "bytes": os.path.getsize(self._path)})
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(v) + 1024 for v in members.values())
        if self._tar is not None and (self._count >= self.maxcount or
                                      (self._count and self._size + size > self.maxsize)):
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size

    def close(self, manifest: dict | None = None) -> list[dict]:
        """Finishes the last shard, removes stale shards of an earlier run, writes the manifest."""
        self._finish()
        written = {s["name"] for s in self.shards}
        for path in glob.glob(glob.escape(self.prefix) + "-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
            if os.path.basename(path) not in written:
                os.remove(path)
        if manifest is not None:
            manifest = {"shards": self.shards, "total": sum(s["samples"] for s in self.shards), **manifest}
            tmp = f"{self.prefix}.manifest.json.tmp"
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, ensure_ascii=False)
            os.replace(tmp, f"{self.prefix}.manifest.json")
        return self.shards

    def abort(self) -> None:
        """Drops the shard in progress (its .tmp file) after an interruption."""
        if self._tar is not None:
            self._tar.close()
            os.remove(self._path + ".tmp")
            self._tar = None
