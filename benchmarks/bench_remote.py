"""Remote shards and Ray conversion, in one run:

(1) the same loader over the same shards from local disk, from moto's S3 server and from a plain
    HTTP server (each in its own process on 127.0.0.1), without and with the shard cache: the
    real Qwen2.5-VL pipeline (2 workers) and raw samples (no transform: the I/O path alone);
(2) fastload-shard on generated records: the local converter against --engine ray with 1 and
    2 CPUs, plain copy and --validate; plus the serial parts (record reading) and per-record cost.

    python benchmarks/bench_remote.py [--samples 400] [--records 3000] [--json results/remote.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import PROCESSOR, machine, need_shared, shard_photo_records, table  # noqa: E402

MAX_PIXELS = 1003520
BATCH = 8


# -- (1) reading ----------------------------------------------------------------------------------
def make_shards(root: pathlib.Path, samples: int) -> list[str]:
    shard_photo_records(root, samples, root / "shards" / "train", "--maxcount", "50")
    return sorted(p.name for p in (root / "shards").glob("train-*.tar"))


def _serve(kind: str, root: str, conn) -> None:
    """A server in its own process (as a real one would be), until the parent goes."""
    sys.path.insert(0, str(ROOT))
    from tests.servers import FileServer, S3Server

    if kind == "http":
        server = FileServer(root)
        conn.send(server.url)
    else:
        server = S3Server()
        os.environ.update(server.env())
        server.upload(root, "bench", sorted(n for n in os.listdir(root) if n.endswith(".tar")))
        conn.send(server.endpoint)
    conn.recv()  # until the parent says stop


def start_server(kind: str, root: str):
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(kind, root, child), daemon=True)
    proc.start()
    return proc, parent, parent.recv()


def loader(urls: str, pipeline: str, cache_dir: str | None):
    import fastload

    if pipeline == "raw":
        ds = fastload.ShardDataset(urls, cache_dir=cache_dir, cache_limit=(4 << 30) if cache_dir else None)
        return fastload.DataLoader(ds, batch_size=BATCH, num_workers=2, collate_fn=lambda b: len(b),
                                   persistent_workers=True)
    transform = fastload.Qwen2VLTransform(str(PROCESSOR), max_pixels=MAX_PIXELS).load()
    ds = fastload.ShardDataset(urls, transform=transform, cache_dir=cache_dir,
                               cache_limit=(4 << 30) if cache_dir else None)
    return fastload.DataLoader(ds, batch_size=BATCH, num_workers=2, collate_fn=fastload.Qwen2VLCollator(),
                               persistent_workers=True)


def batch_samples(batch) -> int:
    return batch if isinstance(batch, int) else int(batch["image_grid_thw"].shape[0])


def epochs(make, n: int = 2) -> list[float]:
    """samples/s of each of ``n`` epochs of one loader (workers persist between epochs)."""
    rates, dl = [], make()
    for _ in range(n):
        start, seen = time.perf_counter(), 0
        for batch in dl:
            seen += batch_samples(batch)
        rates.append(seen / (time.perf_counter() - start))
    del dl
    return rates


def bench_reading(samples: int, tmp: pathlib.Path, rounds: int) -> list[dict]:
    names = make_shards(tmp, samples)
    pattern = "train-{000000..%06d}.tar" % (len(names) - 1)
    size_mb = sum(os.path.getsize(tmp / "shards" / n) for n in names) / 1e6
    print(f"{len(names)} shards, {size_mb:.0f} MB, {samples} samples", file=sys.stderr)
    s3, s3_conn, endpoint = start_server("s3", str(tmp / "shards"))
    http, http_conn, http_url = start_server("http", str(tmp / "shards"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint})
    sources = {"local disk": str(tmp / "shards" / pattern), "S3 (moto)": "s3://bench/" + pattern,
               "HTTP": f"{http_url}/{pattern}"}
    best: dict[tuple, dict] = {}
    try:  # rounds interleave the sources, so that load from elsewhere on the machine hits all alike
        for _ in range(rounds):
            for pipeline in ("qwen2.5-vl", "raw"):
                for where, urls in sources.items():
                    for cached in ([False, True] if where != "local disk" else [False]):
                        cache = tempfile.mkdtemp(dir=tmp) if cached else None
                        rates = epochs(lambda: loader(urls, pipeline, cache))
                        row = {"pipeline": pipeline, "source": where + (" + cache" if cached else ""),
                               "epoch1": rates[0], "epoch2": rates[1], "MB": size_mb}
                        print(row, file=sys.stderr)
                        key = (pipeline, row["source"])
                        if key not in best or row["epoch2"] > best[key]["epoch2"]:
                            best[key] = row
    finally:
        for proc, conn in ((s3, s3_conn), (http, http_conn)):
            conn.send("stop")
            proc.join(timeout=10)
    return list(best.values())


# -- (2) conversion ------------------------------------------------------------------------------
def make_records(root: pathlib.Path, n: int) -> pathlib.Path:
    """``n`` chat records over 200 generated photos of 320-640 px (repeats, like real datasets)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import jpeg_bytes, photo_like

    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(200):
        (root / f"img/{i}.jpg").write_bytes(jpeg_bytes(photo_like(240 + i, 320 + 2 * i, i)))
    for name, count in (("data", n), ("warm", 50)):  # warm: a first small job for Ray
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(count):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                                                 {"role": "assistant", "content": f"Picture {i % 200}."}],
                                    "images": [f"img/{i % 200}.jpg"]}) + "\n")
    return root / "data.jsonl"


def convert_once(engine: str, cpus: int, src: str, out: str, validate: bool, maxcount: int) -> dict:
    """One conversion in a fresh process (Ray started there with ``cpus``), timed inside it."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
extra = dict(validate={validate}, maxcount={maxcount})
if {engine!r} == "ray":
    import ray
    t = time.perf_counter(); ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    from fastload import convert_ray
    t = time.perf_counter()  # a first, small conversion: Ray's workers start, as any first job pays
    convert_ray.convert({src!r}.replace("data", "warm"), {out!r} + "-warm", batch={maxcount} // 2, progress=False,
                        **extra)
    init_s += time.perf_counter() - t
    t = time.perf_counter(); m = convert_ray.convert({src!r}, {out!r}, batch={maxcount} // 2, progress=False, **extra)
else:
    from fastload.cli.shard import main
    args = [{src!r}, {out!r}, "--maxcount", str({maxcount}), "--quiet"] + (["--validate"] if {validate} else [])
    init_s = 0.0; t = time.perf_counter()
    try:
        main(args)
    except SystemExit:
        pass
    m = json.load(open({out!r} + ".manifest.json"))
print(json.dumps({{"seconds": time.perf_counter() - t, "init_s": init_s, "total": m["total"],
                  "shards": len(m["shards"])}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def serial_costs(src: pathlib.Path) -> dict:
    """Per-record CPU costs (process time: steady under load from elsewhere): reading records
    (serial, one task) and converting them (parallel tasks)."""
    from fastload.cli.shard import convert
    from fastload.sources import Columns, open_source

    t = time.process_time()
    records = list(open_source(str(src), Columns(formatting="auto")))
    read_us = (time.process_time() - t) / len(records) * 1e6
    out = {"read_records_us": read_us}
    for validate in (False, True):
        t = time.process_time()
        for r in records[:500]:
            convert(r, source=str(src), root=str(src.parent), max_pixels=None, validate=validate)
        out[f"convert_us{'_validate' if validate else ''}"] = (time.process_time() - t) / 500 * 1e6
    return out


def bench_conversion(records: int, tmp: pathlib.Path) -> tuple[list[dict], dict]:
    src = make_records(tmp / "conv", records)
    rows = []
    for validate in (False, True):
        for engine, cpus in (("local", 1), ("ray", 1), ("ray", 2)):
            out = str(tmp / f"out-{engine}{cpus}-{validate}" / "d")
            r = convert_once(engine, cpus, str(src), out, validate, maxcount=500)
            rows.append({"engine": engine, "cpus": cpus, "validate": validate, "samples/s": r["total"] / r["seconds"],
                         "seconds": r["seconds"], "ray init s": r["init_s"], "shards": r["shards"]})
            print(rows[-1], file=sys.stderr)
    return rows, serial_costs(src)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2, help="reading: best of this many interleaved rounds")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--skip-reading", action="store_true")
    p.add_argument("--skip-conversion", action="store_true")
    args = p.parse_args()
    need_shared()
    print(machine(), f"load average at start {os.getloadavg()[0]:.1f}")
    out = {"machine": machine(), "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if not args.skip_reading:
            out["reading"] = bench_reading(args.samples, tmp, args.rounds)
            print(table(["pipeline", "source", "epoch 1 samples/s", "epoch 2 samples/s"],
                        [[r["pipeline"], r["source"], r["epoch1"], r["epoch2"]] for r in out["reading"]]))
        if not args.skip_conversion:
            out["conversion"], out["per_record"] = bench_conversion(args.records, tmp)
            print(table(["engine", "CPUs", "validate", "samples/s", "s", "ray start + first job s", "shards"],
                        [[r["engine"], r["cpus"], r["validate"], r["samples/s"], r["seconds"], r["ray init s"],
                          r["shards"]] for r in out["conversion"]]))
            print({k: round(v, 1) for k, v in out["per_record"].items()})
    out["loadavg_end"] = os.getloadavg()[0]
    print(f"load average at end {out['loadavg_end']:.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
