"""``fastload-bench``: measure the loader at several worker counts and recommend one.

    fastload-bench 'shards/train-{000000..000009}.tar' --processor qwen2_5_vl --workers 0,1,2,4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from rich.console import Console
from rich.table import Table

from .. import bench
from ..shards import expand_urls
from ..tokenizer import resolve_processor

console = Console(stderr=True, width=None if sys.stderr.isatty() else 170)


def parse_workers(text: str) -> list[int] | str:
    if text == "auto":
        return "auto"
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes a list like 0,1,2,4 or 'auto', not {text!r}") from None
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError("worker counts must be >= 0")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastload-bench", description=__doc__.split("\n")[0])
    p.add_argument("shards", help="shard url(s), brace ranges allowed")
    p.add_argument("--processor", required=True,
                   help="Qwen2.5-VL processor: a folder, or a hub id in the local Hugging Face cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=parse_workers, default=[0, 1, 2, 4], help="e.g. 0,1,2,4 or auto")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per setting (after warm-up)")
    p.add_argument("--rounds", type=int, default=bench.ROUNDS,
                   help=f"windows the seconds are split into; their spread is the noise (default {bench.ROUNDS})")
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--json", help="write all measurements and the recommendation here")
    p.add_argument("--plot", help="draw throughput, CPU and memory against workers (PNG)")
    p.add_argument("--compare", choices=["torch"], help="also run torch DataLoader + transformers processor")
    return p.parse_args(argv)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or the one-line error: checked before
    the sweep too, so that a missing matplotlib does not cost a whole sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fastload-bench: --plot needs matplotlib (pip install 'fastload[plot]')") from None
    return plt


def check_inputs(args) -> None:
    """One-line errors for what would otherwise fail deep inside a worker, or after the sweep."""
    if args.plot:
        pyplot()
    if args.rounds < 1:
        raise SystemExit("fastload-bench: --rounds must be at least 1")
    urls = expand_urls(args.shards)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not urls or len(missing) == len(urls):
        raise SystemExit(f"fastload-bench: no shards match {args.shards!r}")
    if missing:
        raise SystemExit(f"fastload-bench: {len(missing)} of {len(urls)} shards do not exist "
                         f"(first: {missing[0]})")
    try:  # a folder, or a hub id in the local Hugging Face cache
        args.processor = resolve_processor(args.processor)
    except FileNotFoundError as exc:
        raise SystemExit(f"fastload-bench: {args.processor!r} is not a readable processor directory: {exc}") from exc
    config = os.path.join(args.processor, "preprocessor_config.json")
    if not os.path.isfile(config) or not os.access(config, os.R_OK):
        raise SystemExit(f"fastload-bench: {args.processor!r} is not a readable processor directory "
                         "(no preprocessor_config.json)")
    limit = max(64, (os.cpu_count() or 1) * 16)
    too_many = [n for n in (args.workers if isinstance(args.workers, list) else []) if n > limit]
    if too_many:
        raise SystemExit(f"fastload-bench: this machine cannot run {too_many[0]} workers "
                         f"({os.cpu_count()} CPUs; at most {limit})")


def table(result: bench.SweepResult) -> Table:
    t = Table(title="fastload-bench")
    for col in ("loader", "workers", "samples/s", "images/s", "tokens/s", "first batch s", "CPU % (loader)",
                "CPU s/sample", "main RSS MB", "worker RSS MB", "shm MB"):
        t.add_column(col, justify="right")
    for m in result.measurements + result.baseline:
        if m.error:
            t.add_row(m.label, str(m.workers), f"[red]{m.error}[/red]", *[""] * 8)
            continue
        t.add_row(m.label, str(m.workers), f"{m.samples_per_s:.1f} ± {m.noise:.1f}", f"{m.images_per_s:.1f}",
                  f"{m.tokens_per_s:.0f}", f"{m.time_to_first_batch_s:.2f}", f"{m.cpu_percent:.0f}",
                  f"{m.cpu_seconds_per_sample:.3f}", f"{m.main_rss_peak_mb:.0f}",
                  "/".join(f"{r:.0f}" for r in m.worker_rss_peak_mb) or "-", f"{m.shm_peak_mb:.0f}")
    return t


def plot(result: bench.SweepResult, path: str) -> None:
    plt = pyplot()
    fig = figure(result)
    fig.savefig(path)
    plt.close(fig)


def figure(result: bench.SweepResult):
    """Throughput (with the rounds' range) and the loader's CPU and memory against workers,
    the recommended count marked, the settings in the title."""
    plt = pyplot()
    ms = [m for m in result.measurements if m.error is None]
    xs = [m.workers for m in ms]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    a.errorbar(xs, [m.samples_per_s for m in ms], fmt="o-", capsize=3, label="fastload (range of rounds)",
               yerr=[[m.samples_per_s - min(m.round_samples_per_s, default=m.samples_per_s) for m in ms],
                     [max(m.round_samples_per_s, default=m.samples_per_s) - m.samples_per_s for m in ms]])
    for m in result.baseline:
        a.plot([m.workers], [m.samples_per_s], "s", label=m.label)
    a.set_ylabel("samples/s")
    b.plot(xs, [m.cpu_percent for m in ms], "o-", label="CPU % of the loader's processes")
    b.set_ylabel("CPU % (100 = one core)")
    b2 = b.twinx()
    b2.plot(xs, [m.memory_mb for m in ms], "s--", color="tab:red", label="memory MB")
    b2.set_ylabel("memory MB (RSS + shared memory)")
    b2.set_ylim(bottom=0)
    for ax in (a, b):
        ax.set_xlabel("num_workers")
        ax.set_xticks(sorted(set(xs) | {m.workers for m in result.baseline}))
        ax.set_ylim(bottom=0)
        ax.axvline(result.recommendation.workers, color="gray", linestyle=":",
                   label=f"recommended: {result.recommendation.workers}")
    a.legend(loc="lower right")
    b.legend(loc="upper left")
    b2.legend(loc="upper right")
    fig.suptitle(_title(result.settings))
    fig.tight_layout()
    return fig


def _title(settings: dict) -> str:
    shards = settings.get("shards", "")
    return (f"fastload-bench: {os.path.basename(str(shards))}, batch {settings.get('batch_size')}, "
            f"max_pixels {settings.get('max_pixels') or 'default'}, {settings.get('seconds')} s x "
            f"{settings.get('rounds')} rounds per setting, {os.cpu_count()} CPUs")


def report(result: bench.SweepResult, args) -> None:
    console.print(table(result))
    rec = result.recommendation
    console.print(f"[bold]Recommendation: num_workers={rec.workers}[/bold] — {rec.reason}")
    for m in result.baseline:
        same = next((x for x in result.measurements if x.workers == m.workers and x.error is None), None)
        if same and m.samples_per_s:
            console.print(f"fastload vs {m.label} at {m.workers} workers: "
                          f"{same.samples_per_s / m.samples_per_s:.1f}x samples/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    if args.plot:
        plot(result, args.plot)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (also from forked workers) as one line each, without the source line."""
    print(f"fastload-bench: {category.__name__}: {message}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_inputs(args)
    with warnings.catch_warnings():  # restored afterwards: main() may run inside a larger program
        warnings.showwarning = _one_line_warning
        _run(args)


def _run(args) -> None:
    measured: list[bench.Measurement] = []

    def progress(m: bench.Measurement) -> None:
        measured.append(m)
        status = m.error or f"{m.samples_per_s:.1f} ± {m.noise:.1f} samples/s, CPU {m.cpu_percent:.0f}%"
        console.print(f"  {m.label} workers={m.workers}: {status}")

    try:
        result = bench.sweep(args.shards, args.processor, args.workers, args.batch_size, args.seconds,
                             args.max_pixels, args.compare == "torch", on_measurement=progress, rounds=args.rounds)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: what was measured so far[/yellow]")
        ours = [m for m in measured if m.label == "fastload"]
        result = bench.SweepResult(ours, bench.recommend(ours), [m for m in measured if m not in ours],
                                   settings=vars(args))
        report(result, args)
        sys.exit(130)
    report(result, args)


if __name__ == "__main__":
    main()
