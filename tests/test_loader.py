"""fastload.DataLoader against torch.utils.data.DataLoader: same batches, same order; transport,
resume and faults."""
from __future__ import annotations

import gc
import glob
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, IterableDataset, SequentialSampler, get_worker_info

import fastload
from fastload.shards import ShardDataset
from fastload.writer import ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_names() -> set[str]:
    """This process's segments (names start with the trainer's pid), not a parallel run's."""
    return set(glob.glob(f"/dev/shm/fastload-{os.getpid()}-*"))


def mapped_segments() -> set[str]:
    """Names of the segments this process has mapped now: memfds, and named files the main
    process unlinks as it maps them, appear in /proc/self/maps (a name in /dev/shm does not last)."""
    with open("/proc/self/maps") as f:
        return set(re.findall(rf"fastload-{os.getpid()}-\w+-w\d+-s-?\d+-g\d+", f.read()))


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = shm_names()
    yield
    gc.collect()
    deadline = time.time() + 3
    while shm_names() - before and time.time() < deadline:
        time.sleep(0.05)
    assert shm_names() - before == set(), "shared memory segments leaked"


class Squares(Dataset):
    """Map-style; uses torch's RNG so worker seeding is checked too."""

    def __init__(self, n=37):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = get_worker_info()
        return {"x": torch.arange(4, dtype=torch.float32) * i, "i": i, "noise": torch.rand(2),
                "np": np.full(3, i, np.int16), "name": f"item{i}", "worker": -1 if info is None else info.id,
                "bf": torch.full((2,), i / 3, dtype=torch.bfloat16)}


class Counting(IterableDataset):
    """Iterable that shards itself by worker_info (unevenly)."""

    def __init__(self, n=29):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, self.n, workers):
            yield {"i": i, "v": torch.tensor([i, i * i])}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def both(dataset_fn, epochs=1, **kw):
    """Batches from torch's and fastload's loaders built with the same arguments and seeds."""
    out = []
    for cls in (torch.utils.data.DataLoader, fastload.DataLoader):
        torch.manual_seed(1234)
        kwargs = dict(kw)
        if kwargs.pop("seeded", True):
            kwargs["generator"] = torch.Generator().manual_seed(7)
        loader = cls(dataset_fn(), **kwargs)
        out.append([list(loader) for _ in range(epochs)])
    return out


MATRIX = [
    dict(batch_size=4),
    dict(batch_size=4, shuffle=True),
    dict(batch_size=5, shuffle=True, drop_last=True),
    dict(batch_size=None),
    dict(batch_size=None, shuffle=True),
    dict(batch_size=3, sampler=list(reversed(range(37)))),
    dict(batch_sampler=BatchSampler(SequentialSampler(range(37)), 6, False)),
    dict(batch_size=4, collate_fn=lambda items: [it["i"] for it in items]),
    dict(batch_size=4, shuffle=True, seeded=False),
    dict(batch_size=4, in_order=False),
]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("case", range(len(MATRIX)))
def test_map_style_matches_torch(workers, case):
    kw = dict(MATRIX[case])
    if kw.get("in_order") is False and workers == 0:
        pytest.skip("in_order only matters with workers")
    theirs, ours = both(Squares, num_workers=workers, **kw)
    if kw.get("in_order") is False:  # which worker (and so which RNG) serves a batch may differ
        theirs, ours = ([sorted(b["i"].tolist() for b in e) for e in run] for run in (theirs, ours))
    assert_same(theirs, ours)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size,drop_last", [(4, False), (4, True), (None, False)])
def test_iterable_sharded_by_worker_info_matches_torch(workers, batch_size, drop_last):
    theirs, ours = both(Counting, num_workers=workers, batch_size=batch_size, drop_last=drop_last)
    assert_same(theirs, ours)


def test_persistent_workers_two_epochs_match_torch():
    theirs, ours = both(Squares, epochs=2, num_workers=2, batch_size=4, shuffle=True, persistent_workers=True)
    assert_same(theirs, ours)
    theirs, ours = both(Counting, epochs=2, num_workers=2, batch_size=4, persistent_workers=True)
    assert_same(theirs, ours)


def test_len_reiteration_and_worker_init_fn():
    seen = []
    loader = fastload.DataLoader(Squares(), batch_size=5, num_workers=2,
                                 worker_init_fn=lambda wid: torch.manual_seed(100 + wid))
    assert len(loader) == math.ceil(37 / 5)
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == len(loader)
    torch_loader = torch.utils.data.DataLoader(Squares(), batch_size=5, num_workers=2,
                                               worker_init_fn=lambda wid: torch.manual_seed(100 + wid))
    assert_same([b["noise"] for b in first], [b["noise"] for b in torch_loader])
    assert {w for b in first for w in b["worker"].tolist()} == {0, 1}
    seen.append(1)


def test_batches_are_zero_copy_views_of_shared_memory():
    loader = fastload.DataLoader(Squares(), batch_size=4, num_workers=1)
    batch = next(iter(loader))
    # every tensor of the batch lies in the one mapped segment, packed back to back
    ptrs = sorted(t.data_ptr() for t in (batch["x"], batch["i"], batch["noise"], batch["np"], batch["bf"]))
    assert ptrs[-1] - ptrs[0] < 4096
    assert not batch["x"].is_shared()  # not torch's per-tensor shared memory


def test_slots_are_reused_and_memory_stays_bounded():
    class Big(Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return torch.full((256, 1024), float(i))  # 1 MiB per sample

    loader = fastload.DataLoader(Big(), batch_size=4, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    names = set()
    for n, batch in enumerate(it):
        assert float(batch[0, 0, 0]) == n * 4
        names |= mapped_segments()  # the batch in hand is mapped, whatever its segment's name became
        del batch
    # 2 workers x (prefetch + 2) slots, each created once: never one segment per batch
    assert 2 <= len(names) <= 2 * 4, names


def test_holding_every_batch_does_not_deadlock():
    loader = fastload.DataLoader(Squares(100), batch_size=2, num_workers=2, prefetch_factor=1, shm_slots=1)
    kept = list(loader)  # the trainer keeps all 50 batches alive
    assert [int(b["i"][0]) for b in kept] == list(range(0, 100, 2))


# -- resume ----------------------------------------------------------------------------------
def _flatten(batches):
    return [i for b in batches for i in (b["i"].tolist() if isinstance(b, dict) else b)]


def _resume_run(make_loader, k, epochs_before=0):
    """Consume k batches of epoch ``epochs_before``, checkpoint, resume in a new loader."""
    loader = make_loader()
    for _ in range(epochs_before):
        list(loader)
    it = iter(loader)
    head = [next(it) for _ in range(k)]
    state = loader.state_dict()
    del it
    resumed = make_loader()
    for _ in range(epochs_before):  # the trainer rebuilds state, not epochs: no replay
        pass
    resumed.load_state_dict(state)
    tail = list(resumed)
    return _flatten(head), _flatten(tail)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_map_style(workers):
    def make():
        return fastload.DataLoader(Squares(), batch_size=4, shuffle=True, num_workers=workers,
                                   generator=torch.Generator().manual_seed(3))

    full_epochs = [_flatten(e) for e in ([list(make()) for _ in range(1)])]
    reference = make()
    epoch0, epoch1 = _flatten(list(reference)), _flatten(list(reference))
    assert full_epochs[0] == epoch0
    for k in (0, 1, 4, 9):
        head, tail = _resume_run(make, k)
        assert head + tail == epoch0, k
    for k in (0, 3, 10):
        head, tail = _resume_run(make, k, epochs_before=1)
        assert head + tail == epoch1, k


def make_shards(tmp_path, n_shards=5, per_shard=9):
    writer = ShardWriter(str(tmp_path / "r"), maxcount=per_shard)
    for i in range(n_shards * per_shard):
        writer.write(f"{i:05d}", {"cls": str(i).encode()})
    writer.close({})
    return str(tmp_path / ("r-{000000..%06d}.tar" % (n_shards - 1)))


def _decode_cls(sample):
    return int(sample["cls"])


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_exact_resume_shards_with_shuffle_buffer(tmp_path, workers):
    urls = make_shards(tmp_path)

    def make():
        ds = ShardDataset(urls, shuffle=7, seed=5, transform=_decode_cls)
        return fastload.DataLoader(ds, batch_size=3, num_workers=workers)

    epoch = _flatten(list(make()))
    assert sorted(epoch) == list(range(45))
    for k in (1, 2, 5, 8, 13, 14):
        head, tail = _resume_run(make, k)
        assert head + tail == epoch, k


def test_resume_across_epoch_boundary(tmp_path):
    urls = make_shards(tmp_path)

    def make():
        ds = ShardDataset(urls, shuffle=7, seed=5, transform=_decode_cls)
        return fastload.DataLoader(ds, batch_size=4, num_workers=2)

    loader = make()
    epoch0 = _flatten(list(loader))
    state_end = loader.state_dict()  # taken after the epoch finished
    loader.dataset.set_epoch(1)
    epoch1 = _flatten(list(loader))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    resumed = make()
    resumed.load_state_dict(state_end)
    resumed.dataset.set_epoch(1)
    assert _flatten(list(resumed)) == epoch1
    # mid-epoch 1
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.dataset.epoch == 1
    assert _flatten(head) + _flatten(list(resumed)) == epoch1


# -- faults ---------------------------------------------------------------------------------
class Flaky(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        if i in (3, 11):
            raise ValueError(f"bad sample {i}")
        return i


@pytest.mark.parametrize("workers", [0, 2])
def test_on_error_raise_carries_worker_traceback(workers):
    loader = fastload.DataLoader(Flaky(), batch_size=4, num_workers=workers)
    with pytest.raises(ValueError, match="bad sample 3") as exc:
        list(loader)
    if workers:
        assert "worker process" in str(exc.value)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_on_error_skip_counts(workers, policy, caplog):
    loader = fastload.DataLoader(Flaky(), batch_size=4, num_workers=workers, on_error=policy)
    got = [i for b in loader for i in b.tolist()]
    assert got == [i for i in range(20) if i not in (3, 11)]
    assert loader.stats["skipped"] == 2
    if policy == "warn" and workers == 0:
        assert "bad sample 3" in caplog.text


def test_transform_skips_are_counted(tmp_path):
    urls = make_shards(tmp_path, n_shards=2, per_shard=5)

    class EveryThird:
        skipped = 0

        def __call__(self, sample):
            if int(sample["cls"]) % 3 == 0:
                self.skipped += 1
                return None
            return int(sample["cls"])

    loader = fastload.DataLoader(ShardDataset(urls, transform=EveryThird()), batch_size=2, num_workers=2)
    got = sorted(i for b in loader for i in b.tolist())
    assert got == [i for i in range(10) if i % 3] and loader.stats["skipped"] == 4


class Slow(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        time.sleep(0.05)
        return i


def test_killed_worker_raises_quickly_and_cleans_up():
    loader = fastload.DataLoader(Slow(), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    victim = loader.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match=f"pid {victim}.*SIGKILL"):
        for _ in it:
            pass
    assert time.time() - start < 5
    del it


def test_timeout_is_honoured():
    class Stuck(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            time.sleep(30)

    loader = fastload.DataLoader(Stuck(), batch_size=1, num_workers=1, timeout=1)
    start = time.time()
    with pytest.raises(RuntimeError, match="timed out after 1 seconds"):
        next(iter(loader))
    assert time.time() - start < 5


def test_worker_init_error_is_raised():
    def boom(worker_id):
        raise OSError("cannot init")

    with pytest.raises(OSError, match="cannot init"):
        list(fastload.DataLoader(Squares(), num_workers=1, worker_init_fn=boom))


def _run_script(body: str, sig=None, after=1.5):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {ROOT!r})
        import fastload
        {textwrap.indent(textwrap.dedent(body), '        ').strip()}
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if sig is None:
        out, err = proc.communicate(timeout=60)
        return proc, out, err
    line = proc.stdout.readline()  # the script says when it is mid-iteration
    assert line.startswith("ready"), proc.stderr.read()
    pids = [int(p) for p in line.split()[1:]]
    start = time.time()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc, pids, time.time() - start, err


SLOW_LOOP = """
class Slow(torch.utils.data.Dataset):
    def __len__(self): return 10000
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.zeros(1000)
loader = fastload.DataLoader(Slow(), batch_size=4, num_workers=2)
for n, batch in enumerate(loader):
    if n == 3:
        print("ready", *loader.worker_pids, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_ctrl_c_ends_cleanly_within_a_second():
    proc, pids, elapsed, err = _run_script(SLOW_LOOP, sig=signal.SIGINT)
    assert "KeyboardInterrupt" in err
    assert elapsed < 3
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids)


def test_main_process_sigkill_leaves_no_segments():
    proc, pids, _, _ = _run_script(SLOW_LOOP, sig=signal.SIGKILL)
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)  # orphaned workers notice and exit
    # the autouse fixture checks /dev/shm


def test_exception_in_trainer_cleans_up():
    loader = fastload.DataLoader(Squares(), batch_size=2, num_workers=2)
    with pytest.raises(ZeroDivisionError):
        for batch in loader:
            1 / 0


def test_pin_memory_without_accelerator_warns_and_continues():
    with pytest.warns(UserWarning, match="pin"):
        batches = list(fastload.DataLoader(Squares(), batch_size=4, num_workers=1, pin_memory=True))
    assert len(batches) == 10
    with pytest.warns(UserWarning, match="CUDA is not available"):
        loader = fastload.DataLoader(Squares(), batch_size=4, device="cuda")
    assert next(iter(loader))["x"].device.type == "cpu"


def test_prefetch_thread_stage_order_and_state(monkeypatch):
    """The pin/device stage, driven with a CPU copy in place of the CUDA transfer."""
    from fastload.loader import dataloader as dl
    from fastload.loader.prefetch import Transfer

    copies = []

    def fake_call(self, batch):
        copies.append(1)
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}, None

    monkeypatch.setattr(Transfer, "__call__", fake_call)
    monkeypatch.setattr(dl.torch.cuda, "is_available", lambda: True)
    loader = fastload.DataLoader(Squares(), batch_size=4, num_workers=2, pin_memory=True,
                                 generator=torch.Generator().manual_seed(1), shuffle=True)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    fresh = fastload.DataLoader(Squares(), batch_size=4, num_workers=2, shuffle=True,
                                generator=torch.Generator().manual_seed(1))
    reference = _flatten(list(fresh))
    assert _flatten(head) == reference[:12]
    assert state["iterator"]["yielded"] == 3  # prefetched batches are not counted
    resumed = fastload.DataLoader(Squares(), batch_size=4, num_workers=2, shuffle=True,
                                  generator=torch.Generator().manual_seed(1))
    resumed.load_state_dict(state)
    assert _flatten(head) + _flatten(list(resumed)) == reference
    assert copies


def test_qwen_pipeline_end_to_end(tmp_path, processor_dir, mllm_demo):
    """ShardDataset + Qwen2VLTransform + Qwen2VLCollator in the loader equals the same work done inline."""
    from fastload.cli.shard import main as shard_main

    with pytest.raises(SystemExit) as done:
        shard_main(["--dataset-info", str(mllm_demo / "dataset_info.json"), "--dataset", "mllm_demo",
                    str(tmp_path / "demo"), "--quiet", "--maxcount", "2"])
    assert done.value.code == 0
    urls = str(tmp_path / "demo-{000000..000002}.tar")
    transform = fastload.Qwen2VLTransform(processor_dir, max_pixels=200_704)
    collate = fastload.Qwen2VLCollator()
    loader = fastload.DataLoader(ShardDataset(urls, transform=transform), batch_size=2, num_workers=2,
                                 collate_fn=collate)
    batches = list(loader)
    inline = [transform(s) for s in ShardDataset(urls)]
    assert sum(b["input_ids"].shape[0] for b in batches) == 6
    ours = sorted((b["input_ids"][r][b["attention_mask"][r] == 1].tolist() for b in batches
                   for r in range(b["input_ids"].shape[0])))
    assert ours == sorted(e["input_ids"].tolist() for e in inline)
    total = torch.cat([b["pixel_values"] for b in batches])
    assert total.shape[0] == sum(e["pixel_values"].shape[0] for e in inline)
    # one worker keeps the order: patches written by the kernel straight into shared memory
    # equal the transform's own tensors, batch for batch
    one = fastload.DataLoader(ShardDataset(urls, transform=transform), batch_size=2, num_workers=1,
                              collate_fn=collate)
    for batch, pair in zip(one, [inline[i:i + 2] for i in range(0, 6, 2)]):
        expected = collate(pair)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
