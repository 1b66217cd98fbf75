"""``fastload-shard``: convert a dataset into WebDataset shards with a manifest.

    fastload-shard data/mllm_demo.json out/demo --dataset-info data/dataset_info.json --dataset mllm_demo
"""
from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from tqdm import tqdm

from ..decode import decode
from ..header import EXTENSIONS, MAX_IMAGE_PIXELS, ImageDecodeError, check_pixels, read_header, sniff_format
from ..sources import Columns, RecordError, dataset_names, dataset_records, open_source
from ..video import shard_member as video_member
from ..writer import ImageStats, ShardWriter

log = logging.getLogger("fastload.shard")


def resolve_image(ref, root: str, what: str = "image") -> tuple[str, bytes, str | None]:
    """(source name, bytes, file path or None) of an image (or video) reference. An absolute
    path is read as it is, as LLaMA-Factory reads it; a relative one is read from ``root`` and,
    links resolved, must stay inside it: a record cannot reach out of its data directory."""
    if isinstance(ref, (bytes, bytearray)):
        return "<bytes>", bytes(ref), None
    path = ref
    if not os.path.isabs(ref):
        path, real_root = os.path.realpath(os.path.join(root, ref)), os.path.realpath(root)
        if os.path.commonpath([path, real_root]) != real_root:
            raise RecordError(f"{what} path {ref!r} escapes the dataset root {root}")
    try:
        with open(path, "rb") as f:
            return ref, f.read(), path
    except OSError as exc:
        raise RecordError(f"cannot read {what} {ref!r}: {exc.strerror}") from exc


def reencode(data: bytes, max_pixels: int) -> bytes:
    """Shrinks an image to at most ``max_pixels`` (aspect kept), re-encoded as JPEG; the
    decode keeps its bomb and memory limits."""
    import numpy as np
    from PIL import Image

    rgb = np.ascontiguousarray(decode(data))
    height, width = rgb.shape[:2]
    scale = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    out = io.BytesIO()
    Image.fromarray(rgb).resize(size, Image.BICUBIC).save(out, format="JPEG", quality=95)
    return out.getvalue()


def convert(record, *, source: str, root: str, max_pixels: int | None, validate: bool):
    """A record -> ("ok", key, members, image infos) or ("error", message). Runs in pool
    workers. Each image file is read once: the bytes checked are the bytes written. Images
    over the decode limits (``fastload.decode``: pixels, memory) are errors with or
    without ``--validate``, as the loader would refuse them."""
    if isinstance(record, Exception):
        return "error", str(record)
    members, infos = {}, []
    try:
        for i, ref in enumerate(record["images"]):
            name, data, _ = resolve_image(ref, root)
            fmt = sniff_format(data)
            if fmt is None:
                raise RecordError(f"image {name!r} is not a recognised image format")
            header = read_header(data)
            check_pixels(header, MAX_IMAGE_PIXELS)
            width, height = header.size
            if max_pixels and width * height > max_pixels:
                data, fmt = reencode(data, max_pixels), "jpeg"
                width, height = read_header(data).size
            if validate:
                decode(data)
            ext = EXTENSIONS[fmt]
            members[f"{i}.{ext}" if len(record["images"]) > 1 else ext] = data
            infos.append((fmt, width, height, len(data)))
        for i, ref in enumerate(record.get("videos", ())):  # original bytes, numbered: 0.mp4, 1.avi, ...
            name, data, _ = resolve_image(ref, root, "video")
            ext, info = video_member(data, name, validate)
            members[f"{i}.{ext}"] = data
            infos.append(info)
    except (RecordError, ImageDecodeError, ValueError, OSError) as exc:
        return "error", f"{record.get('source', source)} record {record['id']}: {exc}"
    members["json"] = json.dumps(record["meta"], ensure_ascii=False).encode("utf-8")
    return "ok", f"{record['id']:09d}", members, infos


def _convert_chunk(work: Callable, chunk: list) -> list:
    return [work(record) for record in chunk]


def pool_map(work: Callable, records: Iterable, workers: int, chunk: int = 16) -> Iterator:
    """``work(record)`` for each record, in order, in ``workers`` processes, at most two chunks
    per worker ahead (memory stays flat however long the dataset). Unlike
    ``multiprocessing.Pool.imap``, which waits forever for the tasks of a worker that was
    killed, a dead worker raises ``BrokenProcessPool``."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    pending, records = collections.deque(), iter(records)
    try:
        while batch := list(itertools.islice(records, chunk)):
            pending.append(pool.submit(_convert_chunk, work, batch))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastload-shard", description=__doc__.split("\n")[0])
    p.add_argument("input", nargs="?", help="JSON/JSONL file, Parquet file, or image folder "
                   "(optional with --dataset-info/--dataset)")
    p.add_argument("output", help="output prefix: writes PREFIX-000000.tar ... and PREFIX.manifest.json")
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json giving the column mapping")
    p.add_argument("--dataset", help="entry of --dataset-info to convert; several as a,b,c (concatenated)")
    p.add_argument("--llamafactory", metavar="CONFIG",
                   help="a LLaMA-Factory training YAML: its dataset, dataset_dir and media_dir")
    p.add_argument("--format", choices=["auto", "sharegpt", "alpaca"], default=None,
                   help="record format for JSON input (default: from dataset_info, else auto)")
    p.add_argument("--image-root", help="directory relative image paths are read from and must stay in "
                   "(default: the --dataset-info folder, else the input file's; absolute paths are read as they are)")
    p.add_argument("--maxcount", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard (default 1e9)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for --validate / --max-pixels work (default 1; plain copying is I/O bound)")
    p.add_argument("--max-pixels", type=int, help="re-encode images larger than this many pixels")
    p.add_argument("--validate", action="store_true", help="decode every image")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default) or ray: the same conversion as parallel Ray Data tasks "
                   "(pip install 'fastload[ray]'; --workers N caps a local Ray's CPUs)")
    p.add_argument("--ray-address", help="with --engine ray: a running cluster (default: start a local Ray)")
    args = p.parse_args(argv)
    if args.llamafactory:
        from ..llamafactory import shard_inputs

        args.dataset_info, names, media_dir = shard_inputs(args.llamafactory)
        args.dataset, args.image_root = ",".join(names), args.image_root or media_dir
    if args.input is None and not (args.dataset_info and args.dataset):
        p.error("give an input file/folder, or --dataset-info with --dataset")
    return args


def _source(args) -> tuple:
    cols = Columns(formatting="auto")
    path, root = args.input, args.image_root
    if args.dataset_info:
        if not args.dataset:
            raise SystemExit("fastload-shard: --dataset-info needs --dataset NAME")
        # LLaMA-Factory's media_dir defaults to its dataset_dir: the dataset_info.json folder
        root = root or os.path.dirname(os.path.abspath(args.dataset_info))
        names = dataset_names(args.dataset)
        if len(names) > 1 and not path:
            return dataset_records(args.dataset_info, names, args.format), root, args.dataset_info
        cols, data_file = Columns.from_dataset_info(args.dataset_info, names[0])
        path = path or data_file
    if args.format:
        cols.formatting = args.format
    if not os.path.exists(path):
        raise SystemExit(f"fastload-shard: input {path!r} does not exist")
    root = root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return open_source(path, cols), root, path


def run(args) -> int:
    if args.engine == "ray":
        from ..convert_ray import run_cli

        return run_cli(args)
    records, root, path = _source(args)
    # Without --validate or --max-pixels there is nothing to compute per image: conversion is
    # bound by reading and writing, and worker processes only add copies (measured in
    # benchmarks/RESULTS.md), so it stays in this process.
    parallel = args.workers > 1 and (args.validate or args.max_pixels)
    if args.workers > 1 and not parallel:
        log.info("--workers %d: nothing to compute per image, converting in one process", args.workers)
    work = partial(convert, source=path, root=root, max_pixels=args.max_pixels, validate=args.validate)
    writer = ShardWriter(args.output, maxcount=args.maxcount, maxsize=int(args.maxsize))
    stats, errors, start = ImageStats(), [], time.perf_counter()
    results = pool_map(work, records, args.workers) if parallel else map(work, records)
    bar = tqdm(results, unit=" samples", disable=args.quiet, desc="sharding")
    try:
        for result in bar:
            if result[0] == "error":
                errors.append(result[1])
                log.warning("skipped %s", result[1])
                if args.on_error == "fail":
                    raise SystemExit(f"fastload-shard: {result[1]}")
                continue
            _, key, members, infos = result
            writer.write(key, members)
            for info in infos:
                stats.add(*info)
    except BrokenProcessPool as exc:
        writer.abort()
        raise SystemExit("fastload-shard: a worker process died (killed, or out of memory?); "
                         "no partial shard was kept") from exc
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - start
    shards = writer.close({"source": os.path.abspath(path), "images": stats.summary(),
                           "videos": stats.videos.summary(), "skipped": len(errors), "errors": errors[:100]})
    total = sum(s["samples"] for s in shards)
    print(f"fastload-shard: {total} samples, {stats.summary()['count']} images, {stats.videos.summary()['count']} "
          f"videos in {len(shards)} shards "
          f"({sum(s['bytes'] for s in shards) / 1e6:.1f} MB) in {elapsed:.1f}s "
          f"({total / max(elapsed, 1e-9):.0f} samples/s); skipped {len(errors)}", file=sys.stderr)
    for message in errors[:10]:
        print(f"  skipped {message}", file=sys.stderr)
    return 0


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        sys.exit(run(args))
    except KeyboardInterrupt:
        print("fastload-shard: interrupted; no partial shard was kept", file=sys.stderr)
        sys.exit(130)
    except (KeyError, RecordError, ImportError) as exc:
        print(f"fastload-shard: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
