"""fastload-bench: the recommendation logic on synthetic measurements, and the command end to end."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import psutil
import pytest
import torch

from fastload import bench
from fastload.bench import Measurement, recommend
from fastload.cli import bench as cli

from .test_shard_cli import run_cli as shard_cli
from .test_shard_cli import write_chat_dataset


def m(workers, sps, mem=100.0, error=None, rounds=()):
    return Measurement(workers=workers, samples_per_s=sps, main_rss_peak_mb=mem, error=error,
                       round_samples_per_s=list(rounds))


def test_recommends_smallest_on_the_plateau():
    ms = [m(0, 10), m(1, 30), m(2, 55), m(4, 57), m(8, 56)]
    rec = recommend(ms, memory_mb=10_000)
    assert rec.workers == 2 and "within 5%" in rec.reason


def test_noisy_ties_prefer_fewer_workers():
    ms = [m(1, 100.0), m(2, 98.0), m(3, 101.0)]
    assert recommend(ms, memory_mb=10_000).workers == 1


def test_differences_within_the_noise_do_not_decide():
    """2 workers measure 12% faster than 1, but each round of 1 worker overlaps 2's: two runs
    could rank them either way, so the smaller count is recommended; without the overlap, 2."""
    noisy = [m(1, 100.0, rounds=(85, 100, 115)), m(2, 112.0, rounds=(104, 112, 120))]
    rec = recommend(noisy, memory_mb=10_000)
    assert rec.workers == 1 and "run-to-run noise" in rec.reason
    steady = [m(1, 100.0, rounds=(99, 100, 101)), m(2, 112.0, rounds=(111, 112, 113))]
    assert recommend(steady, memory_mb=10_000).workers == 2


def test_memory_limit_excludes_settings():
    ms = [m(1, 30, mem=1000), m(2, 60, mem=3000), m(4, 90, mem=9000)]
    rec = recommend(ms, memory_mb=10_000)  # budget 8000 MB
    assert rec.workers == 2 and "[4] workers would not fit" in rec.reason
    rec = recommend(ms, memory_mb=1000)
    assert rec.workers == 1 and "no setting fits" in rec.reason


def test_errors_and_nothing_measured():
    assert recommend([m(1, 0, error="OSError: x")]).workers == 0
    assert recommend([m(1, 10), m(2, 0, error="boom")], memory_mb=10_000).workers == 1


def test_auto_search_doubles_then_stops_and_refines():
    curve = {1: 10.0, 2: 19.0, 3: 24.0, 4: 25.0, 6: 25.5, 8: 25.2}
    calls = []

    def fake(n):
        calls.append(n)
        return m(n, curve.get(n, 25.0))

    results = bench.auto_worker_counts(fake, max_workers=16)
    assert calls == [1, 2, 4, 8, 6]  # 8 no better than 4: stop, then refine between 4 and 8
    assert [r.workers for r in results] == [1, 2, 4, 6, 8]


def test_auto_search_stops_at_the_first_failure():
    calls = []

    def failing(n):
        calls.append(n)
        return m(n, 0, error="OSError: cannot start") if n >= 2 else m(n, 10)

    assert [r.workers for r in bench.auto_worker_counts(failing, max_workers=16)] == [1, 2]
    assert calls == [1, 2]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, processor_dir):
    root = tmp_path_factory.mktemp("bench")
    rows = write_chat_dataset(root, n=16)
    (root / "d.json").write_text(json.dumps(rows))
    assert shard_cli(root / "d.json", root / "s", "--maxcount", 4) == 0
    return str(root / "s-{000000..000003}.tar")


def test_command_end_to_end_with_json(tiny_shards, processor_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    cli.main([tiny_shards, "--processor", str(processor_dir), "--workers", "0,1,2", "--seconds", "0.5",
              "--batch-size", "2", "--json", str(out), "--compare", "torch"])
    data = json.loads(out.read_text())
    assert [x["workers"] for x in data["measurements"]] == [0, 1, 2]
    fields = {"samples_per_s", "images_per_s", "tokens_per_s", "time_to_first_batch_s", "cpu_percent",
              "round_samples_per_s", "cpu_seconds_per_sample", "main_rss_peak_mb", "worker_rss_peak_mb",
              "shm_peak_mb", "memory_mb"}
    for x in data["measurements"]:
        assert fields <= set(x) and x["error"] is None and x["samples_per_s"] > 0
        assert len(x["round_samples_per_s"]) == bench.ROUNDS and x["cpu_percent"] > 0
        assert x["images_per_s"] > 0 and x["tokens_per_s"] > x["samples_per_s"]
    assert len(data["measurements"][2]["worker_rss_peak_mb"]) == 2
    assert data["baseline"][0]["label"] == "torch+transformers" and data["baseline"][0]["samples_per_s"] > 0
    assert data["recommendation"]["workers"] in (0, 1, 2) and data["recommendation"]["reason"]
    err = capsys.readouterr().err
    assert "Recommendation: num_workers=" in err and "fastload vs torch+transformers" in err


@pytest.mark.parametrize("args,message", [
    (["nothing-{000..003}.tar", "--processor", "."], "no shards match"),
    (["{shards}", "--processor", "/nonexistent"], "not a readable processor directory"),
    (["{shards}", "--processor", "{proc}", "--workers", "100000"], "cannot run 100000 workers"),
    (["{shards}", "--processor", "{proc}"], "do not exist"),
])
def test_bad_input_is_one_line(tiny_shards, processor_dir, capsys, args, message):
    if message == "do not exist":  # one shard more than there is
        tiny_shards = tiny_shards.replace("000003}", "000004}")
    args = [a.replace("{shards}", tiny_shards).replace("{proc}", str(processor_dir)) for a in args]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_ctrl_c_reports_what_was_measured(tiny_shards, processor_dir, monkeypatch, capsys):
    def interrupted(*args, on_measurement=None, **kw):
        on_measurement(m(1, 12.5))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "sweep", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main([tiny_shards, "--processor", str(processor_dir)])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "12.5" in err and "num_workers=1" in err


def test_cpu_is_the_loader_process_tree_not_the_machine():
    """A child's CPU time counts, while it runs (as workers do) and once it has ended; a busy
    process outside the tree does not, as the machine-wide CPU did."""
    burn = ("import time\nt, w = time.process_time(), time.time()\n"
            "while time.process_time() - t < {} and time.time() - w < 20: pass\n")
    me = psutil.Process()
    before = bench.tree_cpu_seconds(me)
    # outside: started by a shell that exits at once, so the burner belongs to init, not to us
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{burn.format(3.0)}' >/dev/null 2>&1 &"], check=True)
    child = subprocess.Popen([sys.executable, "-c", burn.format(0.5) + "time.sleep(60)"])
    try:
        deadline = time.time() + 20
        while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.5 and time.time() < deadline:
            time.sleep(0.05)
        running = bench.tree_cpu_seconds(me) - before
    finally:
        child.kill()
        child.wait()
    ended = bench.tree_cpu_seconds(me) - before
    assert 0.5 <= running < 1.5 and running <= ended < 1.5, (running, ended)


class ThreadsSeen:
    """A loader whose batches record torch's thread count while they are made."""

    def __init__(self):
        self.threads = set()

    def __iter__(self):
        while True:
            self.threads.add(torch.get_num_threads())
            yield [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_zero_workers_run_with_one_torch_thread_as_a_worker_does(workers):
    """torch's worker loop sets one thread; the 0-worker row runs in the main process, so it
    pins one as well (and gives the previous count back); other rows leave the main alone."""
    before = torch.get_num_threads()
    loader = ThreadsSeen()
    bench.measure(lambda: loader, workers, seconds=0.05, rounds=1)
    assert loader.threads == ({1} if workers == 0 else {before})
    assert torch.get_num_threads() == before


def test_plot_is_checked_before_the_sweep(tiny_shards, processor_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "sweep", lambda *a, **k: pytest.fail("swept before checking matplotlib"))
    with pytest.raises(SystemExit, match="needs matplotlib"):
        cli.main([tiny_shards, "--processor", str(processor_dir), "--plot", str(tmp_path / "p.png")])


def test_plot_axes_marks_and_title(tmp_path):
    ms = [m(0, 5, rounds=(4, 5, 6)), m(1, 9, rounds=(8, 9, 10)), m(4, 9.2, rounds=(9, 9.2, 9.4))]
    result = bench.SweepResult(ms, recommend(ms, memory_mb=1e4), settings={
        "shards": "out/train-{000000..000009}.tar", "batch_size": 8, "max_pixels": 1003520, "seconds": 20.0, "rounds": 3})
    fig = cli.figure(result)
    for ax in fig.axes:
        assert ax.get_ylabel() and ax.get_ylim()[0] == 0
    for ax in fig.axes[:2]:
        assert list(ax.get_xticks()) == [0, 1, 4] and ax.get_xlabel() == "num_workers"
        marks = [line for line in ax.get_lines() if line.get_label() == f"recommended: {result.recommendation.workers}"]
        assert marks and list(marks[0].get_xdata()) == [result.recommendation.workers] * 2
    title = fig._suptitle.get_text()
    assert "train-{000000..000009}.tar" in title and "batch 8" in title and "1003520" in title and "3 rounds" in title
    cli.plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warnings_print_as_one_line(tiny_shards, processor_dir, monkeypatch, capsys):
    def warns(*args, **kw):
        warnings.warn("a worker count to think about", UserWarning)
        return bench.SweepResult([m(1, 10)], recommend([m(1, 10)], memory_mb=1e4))

    monkeypatch.setattr(bench, "sweep", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # whatever filters pytest runs with
        cli.main([tiny_shards, "--processor", str(processor_dir)])
    err = capsys.readouterr().err
    assert "fastload-bench: UserWarning: a worker count to think about\n" in err
    assert "warnings.warn" not in err and ".py:" not in err
