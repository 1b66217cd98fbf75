"""``fastload-shard --engine ray``: the local converter's work spread over a Ray cluster with Ray Data.

The records come from the same reader as the local converter (one streaming Ray task, so the
records, their ids and their error messages are the local converter's by construction); they
travel in batches of ``batch`` records to parallel tasks that run the local converter's own
per-record step (:func:`fastload.cli.shard.convert`: read, sniff, validate, re-encode) and
write their batch with fastload's :class:`~fastload.writer.ShardWriter`. Each task's shards
are staged under hidden names beside the output (or uploaded under them, for an fsspec url)
and the driver renames them, in input order, to ``PREFIX-000000.tar ...`` once every task has
finished, then writes the manifest last: an interrupted run leaves nothing that looks whole.

What differs from the local converter is where shards break: a task's last shard holds the
rest of its batch, so shards can hold fewer than ``maxcount`` samples mid-sequence. The
manifest says so (``engine``, ``shard_boundaries``); the samples, in order, and every byte of
every member are the same.

Serial parts, for sizing a cluster: the record reader (one task; JSON parsing only) and the
driver's renames and manifest. Everything per image runs in the parallel tasks.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

from .writer import ImageStats, ShardWriter

BOUNDARIES = ("each Ray task writes one batch of consecutive input records into its own shards "
              "of at most maxcount samples / maxsize bytes; shards follow input order, and a "
              "batch's last shard may hold fewer samples")


def require_ray():
    """Ray Data, or an ImportError that says how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("--engine ray needs Ray Data: pip install 'fastload[ray]' "
                          "(or leave out --engine ray for the local converter)") from exc
    return ray


@dataclass(frozen=True)
class Job:
    """What every conversion task needs (pickled to the workers)."""

    output: str
    source: str
    root: str
    maxcount: int = 10_000
    maxsize: int = 1 << 30
    max_pixels: int | None = None
    validate: bool = False
    run_id: str = ""


# -- where shards go ------------------------------------------------------------------------
class Destination:
    """A shard prefix on local disk or behind an fsspec url: staging, renaming, the manifest."""

    def __init__(self, prefix: str):
        from .remote import is_remote

        self.remote = is_remote(prefix)
        if self.remote:
            from fsspec.core import url_to_fs

            self.fs, path = url_to_fs(prefix)
            self.dir, self.base = path.rsplit("/", 1) if "/" in path else ("", path)
        else:
            path = os.path.abspath(prefix.removeprefix("file://"))
            self.dir, self.base = os.path.dirname(path), os.path.basename(path)
            os.makedirs(self.dir, exist_ok=True)

    def join(self, name: str) -> str:
        return f"{self.dir}/{name}" if self.remote else os.path.join(self.dir, name)

    def staged_pattern(self, run_id: str = "*") -> str:
        return self.join(f".{self.base}.ray-{run_id}-*.tar*")

    def writer_prefix(self, run_id: str, task: str) -> tuple[str, str | None]:
        """(prefix for the task's ShardWriter, its local temp dir to remove, if any)."""
        name = f".{self.base}.ray-{run_id}-{task}"
        if not self.remote:
            return os.path.join(self.dir, name), None
        tmp = tempfile.mkdtemp(prefix="fastload-ray-")
        return os.path.join(tmp, name), tmp

    def stage(self, local_path: str) -> str:
        """The task's finished shard where the driver will find it (uploaded for a url)."""
        if not self.remote:
            return local_path
        target = self.join(os.path.basename(local_path))
        self.fs.put_file(local_path, target)
        os.remove(local_path)
        return target

    def commit(self, staged: str, name: str) -> None:
        if self.remote:
            self.fs.mv(staged, self.join(name))
        else:
            os.replace(staged, self.join(name))

    def drop(self, paths: Iterable[str]) -> None:
        for path in paths:
            try:
                self.fs.rm(path) if self.remote else os.remove(path)
            except FileNotFoundError:
                pass

    def existing(self, pattern: str) -> list[str]:
        return list(self.fs.glob(pattern)) if self.remote else glob.glob(pattern)

    def write_text(self, name: str, text: str) -> None:
        """Under a temporary name, then renamed: a manifest is there whole or not at all."""
        tmp = name + ".tmp"
        if self.remote:
            with self.fs.open(self.join(tmp), "w") as f:
                f.write(text)
        else:
            with open(self.join(tmp), "w") as f:
                f.write(text)
        self.commit(self.join(tmp), name)


# -- the tasks -----------------------------------------------------------------------------
def read_batches(_row: dict, records: Callable[[], Iterable], batch: int) -> Iterator[dict]:
    """Ray Data ``flat_map``: the source's records, ``batch`` at a time, numbered."""
    chunk, seq = [], 0
    for record in records():
        chunk.append(record)
        if len(chunk) == batch:
            yield {"seq": seq, "records": pickle.dumps(chunk)}
            chunk, seq = [], seq + 1
    if chunk:
        yield {"seq": seq, "records": pickle.dumps(chunk)}


def convert_and_write(rows: dict, job: Job) -> dict:
    """Ray Data ``map_batches``: converts a batch of records with the local converter's own
    step and writes the good ones into staged shards."""
    from .cli.shard import convert as convert_record

    out = []
    for seq, blob in zip(rows["seq"], rows["records"]):
        dest = Destination(job.output)
        prefix, tmp = dest.writer_prefix(job.run_id, f"{int(seq):09d}")
        writer = ShardWriter(prefix, maxcount=job.maxcount, maxsize=job.maxsize)
        infos, errors, samples = [], [], 0
        try:
            for record in pickle.loads(blob):
                result = convert_record(record, source=job.source, root=job.root, max_pixels=job.max_pixels,
                                 validate=job.validate)
                if result[0] == "error":
                    errors.append(result[1])
                    continue
                _, key, members, image_infos = result
                writer.write(key, members)
                infos += image_infos
                samples += 1
            shards = writer.close()
        except BaseException:
            writer.abort()
            raise
        staged = [dest.stage(os.path.join(os.path.dirname(prefix), s["name"])) for s in shards]
        if tmp:
            os.rmdir(tmp)
        out.append(pickle.dumps({"seq": int(seq), "samples": samples, "errors": errors, "infos": infos,
                                 "shards": [{**s, "staged": p} for s, p in zip(shards, staged)]}))
    return {"result": out}


# -- the driver ------------------------------------------------------------------------------
def _init(ray, address: str | None, num_cpus: int | None, quiet: bool) -> None:
    if ray.is_initialized():
        return
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    ray.init(include_dashboard=False, log_to_driver=not quiet, **kwargs)


def _dataset(ray, records: Callable[[], Iterable], job: Job, batch: int, progress: bool):
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = 1 << 20  # batches stream to the tasks as they are read
    ds = ray.data.from_items([{"source": job.source}])
    ds = ds.flat_map(partial(read_batches, records=records, batch=batch), num_cpus=0)
    return ds.map_batches(partial(convert_and_write, job=job), batch_size=1)


def _collect(ds, on_error: str, progress: bool) -> list[dict]:
    """Every task's result, in input order; stops at the first bad record under ``fail``."""
    from tqdm import tqdm

    results = []
    with tqdm(unit=" samples", disable=not progress, desc="sharding (ray)", file=sys.stderr) as bar:
        for row in ds.iter_rows():
            result = pickle.loads(row["result"])
            results.append(result)
            bar.update(result["samples"] + len(result["errors"]))
            if on_error == "fail" and result["errors"]:
                raise ConversionFailed(result["errors"][0])
    return sorted(results, key=lambda r: r["seq"])


class ConversionFailed(RuntimeError):
    """``on_error="fail"`` met a bad record (the message names it)."""


def _finish(dest: Destination, results: list[dict], manifest: dict) -> dict:
    """Renames the staged shards in order, removes an earlier run's extra shards, writes the manifest."""
    shards = []
    for result in results:
        for shard in result["shards"]:
            name = f"{dest.base}-{len(shards):06d}.tar"
            dest.commit(shard["staged"], name)
            shards.append({"name": name, "samples": shard["samples"], "bytes": shard["bytes"]})
    keep = {s["name"] for s in shards}
    stale = [p for p in dest.existing(dest.join(f"{dest.base}-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"))
             if p.rsplit("/", 1)[-1] not in keep]
    dest.drop(stale)
    manifest = {"shards": shards, "total": sum(s["samples"] for s in shards), **manifest}
    dest.write_text(f"{dest.base}.manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def convert_records(records: Callable[[], Iterable], output: str, *, source: str, root: str,
                    maxcount: int = 10_000, maxsize: int = 1 << 30, max_pixels: int | None = None,
                    validate: bool = False, on_error: str = "skip", batch: int | None = None,
                    address: str | None = None, num_cpus: int | None = None,
                    progress: bool = True) -> dict:
    """Converts ``records()`` (a picklable callable returning the records, called on a Ray
    worker) into ``output``'s shards and manifest; returns the manifest. ``source`` names the
    input in error messages (as the local converter names it) and, made absolute, in the manifest.

    ``batch`` records per task (default ``maxcount``: shards as full as the local
    converter's; smaller gives more parallelism on small inputs). Connects to ``address``
    (a running cluster), or reuses an initialised Ray, or starts a local one with ``num_cpus``.
    """
    ray = require_ray()
    _init(ray, address, num_cpus, quiet=not progress)
    dest = Destination(output)
    job = Job(output, source, root, maxcount, int(maxsize), max_pixels, validate, uuid.uuid4().hex[:12])
    try:
        results = _collect(_dataset(ray, records, job, batch or maxcount, progress), on_error, progress)
    except BaseException:
        dest.drop(dest.existing(dest.staged_pattern(job.run_id)))
        raise
    stats, errors = ImageStats(), [e for r in results for e in r["errors"]]
    for info in (i for r in results for i in r["infos"]):
        stats.add(*info)
    return _finish(dest, results, {"source": os.path.abspath(source), "images": stats.summary(),
                                   "videos": stats.videos.summary(), "skipped": len(errors),
                                   "errors": errors[:100], "engine": "ray", "shard_boundaries": BOUNDARIES})


def convert(input: str, output: str, *, cols=None, root: str | None = None, **kwargs) -> dict:
    """The Python API for one input (JSON/JSONL, Parquet or an image folder), as
    ``fastload-shard INPUT OUTPUT --engine ray``; ``kwargs`` as :func:`convert_records`."""
    from .sources import Columns, open_source

    root = root or (input if os.path.isdir(input) else os.path.dirname(os.path.abspath(input)))
    records = partial(open_source, input, cols or Columns(formatting="auto"))
    return convert_records(records, output, source=input, root=root, **kwargs)


def _args_records(args) -> Iterable:
    """The CLI's records, read on a worker exactly as the local converter reads them."""
    from .cli.shard import _source

    return _source(args)[0]


def run_cli(args) -> int:
    """``fastload-shard ... --engine ray``: the same arguments, the same summary line."""
    from .cli.shard import _source

    _, root, path = _source(args)
    start = time.perf_counter()
    try:
        manifest = convert_records(partial(_args_records, args), args.output, source=path,
                                   root=root, maxcount=args.maxcount, maxsize=int(args.maxsize),
                                   max_pixels=args.max_pixels, validate=args.validate, on_error=args.on_error,
                                   address=args.ray_address, num_cpus=args.workers if args.workers > 1 else None,
                                   progress=not args.quiet)
    except ConversionFailed as exc:
        raise SystemExit(f"fastload-shard: {exc}") from None
    elapsed = time.perf_counter() - start
    total, shards = manifest["total"], manifest["shards"]
    print(f"fastload-shard: {total} samples, {manifest['images']['count']} images in {len(shards)} shards "
          f"({sum(s['bytes'] for s in shards) / 1e6:.1f} MB) in {elapsed:.1f}s "
          f"({total / max(elapsed, 1e-9):.0f} samples/s, ray); skipped {manifest['skipped']}", file=sys.stderr)
    for message in manifest["errors"][:10]:
        print(f"  skipped {message}", file=sys.stderr)
    return 0
