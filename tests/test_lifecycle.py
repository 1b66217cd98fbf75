"""Epochs and lifecycle: any number of epochs with or without persistent workers and the
prefetch stage, ``break`` then a new epoch, ``del loader`` mid-epoch, every start method; and
nothing left behind (threads, worker processes, file descriptors, /dev/shm segments)."""
from __future__ import annotations

import gc
import glob
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import fastload
from fastload.tree import map_tree
from tests.datasets_for_tests import Numbers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- what a loader may leave behind ------------------------------------------------------------
def shm_names() -> set[str]:
    """This process's segments (other test runs on the machine may have theirs)."""
    return set(glob.glob(f"/dev/shm/fastload-{os.getpid()}-*"))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastload-prefetch"]


def fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


class Baseline:
    """Threads, descriptors and segments before a test; ``assert_clean`` compares after."""

    def __init__(self):
        gc.collect()
        self.threads = set(threading.enumerate())
        self.fds = fds()
        self.shm = shm_names()

    def problems(self, pids) -> list[str]:
        found = []
        threads = set(threading.enumerate()) - self.threads
        if threads:
            found.append(f"threads left: {sorted(t.name for t in threads)}")
        live = [p for p in pids if alive(p)]
        if live:
            found.append(f"worker processes left: {live}")
        extra = {fd: target for fd, target in fds().items() if fd not in self.fds}
        if len(fds()) > len(self.fds):
            found.append(f"file descriptors left: {extra}")
        if shm_names() - self.shm:
            found.append(f"segments left: {sorted(shm_names() - self.shm)}")
        return found

    def assert_clean(self, pids=(), timeout: float = 5.0) -> None:
        deadline = time.time() + timeout
        while True:
            gc.collect()
            problems = self.problems(pids)
            if not problems:
                return
            if time.time() > deadline:
                raise AssertionError("; ".join(problems))
            time.sleep(0.05)


# -- running epochs the way a trainer does ----------------------------------------------------------
def plain(batch):
    """A private copy: keeping it holds no worker's slot and no pinned or device memory."""
    return map_tree(batch, lambda x: isinstance(x, (torch.Tensor, np.ndarray)), lambda x: x.copy()
                    if isinstance(x, np.ndarray) else x.clone())


def run(loader, plan, watch=None):
    """One epoch per entry of ``plan``: ``None`` runs it to the end, ``k`` breaks after ``k``
    batches. ``watch(loader, epoch, n)`` runs after each batch; returns the batches."""
    epochs = []
    for epoch, k in enumerate(plan):
        got, batch = [], None
        for batch in loader:
            got.append(plain(batch))
            if watch is not None:
                watch(loader, epoch, len(got))
            if k is not None and len(got) == k:
                break
        del batch
        epochs.append(got)
    return epochs


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b.cpu())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def without_noise(batches):
    return [{key: v for key, v in b.items() if key != "noise"} for b in batches]


def settled(epochs, plan):
    """Drops the random draws of the epochs after the first ``break`` when workers persist (or
    loading runs in process): how far a worker (or the prefetch thread) got past the break
    before the next epoch began is a matter of timing, in torch's loader as in this one, and so
    is where its RNG stands afterwards."""
    out, broken = [], False
    for batches, k in zip(epochs, plan):
        out.append(without_noise(batches) if broken else batches)
        broken = broken or k is not None
    return out


def torch_reference(plan, dataset=None, **kw):
    torch.manual_seed(99)
    kw.setdefault("generator", torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader(dataset or Numbers(), **kw)
    return run(loader, plan)


def fastload_run(plan, dataset=None, watch=None, **kw):
    torch.manual_seed(99)
    kw.setdefault("generator", torch.Generator().manual_seed(5))
    loader = fastload.DataLoader(dataset or Numbers(), **kw)
    pids: set[int] = set()

    def watch_all(loader, epoch, n):
        assert len(prefetch_threads()) <= 1
        pids.update(loader.worker_pids)
        if watch is not None:
            watch(loader, epoch, n)

    epochs = run(loader, plan, watch_all)
    return loader, epochs, pids


# three breaks, four full epochs: the third and later epochs reuse persistent workers
PLAN = [None, 3, None, 1, None, 2, None]
STAGES = {"none": {}, "cpu": {"device": "cpu"}}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("persistent", [False, True])
def test_epochs_and_breaks_match_torch_and_leave_nothing_behind(persistent, stage):
    base = Baseline()
    kw = dict(batch_size=4, shuffle=True, num_workers=2, persistent_workers=persistent)
    reference = torch_reference(PLAN, **kw)
    epoch_pids: dict[int, set[int]] = {}

    def watch(loader, epoch, n):
        epoch_pids.setdefault(epoch, set()).update(loader.worker_pids)
        if n == 1 and epoch > 0 and not persistent:  # the last epoch's workers are gone by now
            assert not any(alive(p) for p in epoch_pids[epoch - 1])

    loader, epochs, pids = fastload_run(PLAN, watch=watch, **STAGES[stage], **kw)
    if persistent:
        reference, epochs = settled(reference, PLAN), settled(epochs, PLAN)
    assert_same(reference, epochs)
    assert [len(e) for e in epochs] == [10, 3, 10, 1, 10, 2, 10]
    assert not prefetch_threads()  # every loop has ended: no stage is running
    if persistent:
        assert len(pids) == 2  # the same two workers served all seven epochs
    else:
        assert len(pids) == 2 * len(PLAN)
    del loader
    base.assert_clean(pids)


@pytest.mark.parametrize("persistent", [False, True])
def test_break_stops_the_prefetch_thread_at_once(persistent):
    base = Baseline()
    loader = fastload.DataLoader(Numbers(), batch_size=2, num_workers=2, device="cpu",
                                 persistent_workers=persistent)
    for n, batch in enumerate(loader):
        assert len(prefetch_threads()) == 1  # the stage really runs, on the CPU
        if n == 2:
            break
    del batch
    assert not prefetch_threads()  # leaving the loop dropped the iterator, which joined the thread
    pids = loader.worker_pids
    assert all(alive(p) for p in pids) == persistent  # non-persistent workers went with it
    assert len(list(loader)) == 19  # and a new epoch runs in full
    del loader
    base.assert_clean(pids)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("persistent", [False, True])
def test_del_loader_mid_epoch(persistent, stage):
    base = Baseline()
    loader = fastload.DataLoader(Numbers(), batch_size=3, num_workers=2, persistent_workers=persistent,
                                 **STAGES[stage])
    it = iter(loader)
    first = next(it)
    pids = loader.worker_pids
    del loader  # like torch, the iterator the trainer holds keeps working...
    assert int(next(it)["i"][0]) == int(first["i"][0]) + 3
    del it, first  # ...and once it goes too, everything goes
    base.assert_clean(pids)

    loader = fastload.DataLoader(Numbers(), batch_size=3, num_workers=2, persistent_workers=persistent,
                                 **STAGES[stage])
    for batch in loader:
        pids = loader.worker_pids
        break
    del loader, batch
    base.assert_clean(pids)


def test_readme_setup_pin_memory_with_persistent_workers(monkeypatch):
    """The README's loader (``pin_memory=True, persistent_workers=True``) once failed in its
    second epoch. Pinning needs CUDA, so here a copy stands in for ``pin_memory()``; the
    stage's thread, queue and hand-over are the real ones."""
    pinned = []

    def fake_pin(self, *args, **kwargs):
        pinned.append(1)
        return self.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    base = Baseline()
    kw = dict(batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    reference = torch_reference(PLAN, **kw)
    with pytest.warns(UserWarning, match="pin"):  # torch's: no accelerator to pin for
        loader, epochs, pids = fastload_run(PLAN, pin_memory=True, **kw)
    assert_same(settled(reference, PLAN), settled(epochs, PLAN))
    assert pinned and len(pids) == 2
    del loader
    base.assert_clean(pids)


def test_cpu_stage_copies_batches_out_of_shared_memory():
    loader = fastload.DataLoader(Numbers(), batch_size=4, num_workers=2, device="cpu")
    it = iter(loader)
    batch = next(it)
    segments = [np.frombuffer(buf, np.uint8) for _, buf in loader._front.source._segments.values()]
    assert segments
    for t in (batch["x"], batch["noise"], batch["i"]):
        assert not any(s.ctypes.data <= t.data_ptr() < s.ctypes.data + s.nbytes for s in segments)
    assert isinstance(batch["np"], torch.Tensor)  # default_collate made it a tensor, copied as well
    kept = [batch] + list(it)  # kept batches hold no slot: no one-off segments were needed
    assert loader._front.source._permits == [0, 0]
    assert [int(b["i"][0]) for b in kept] == list(range(0, 37, 4))


def test_cpu_stage_state_counts_only_handed_over_batches():
    def make():
        return fastload.DataLoader(Numbers(), batch_size=4, shuffle=True, num_workers=2, device="cpu",
                                   generator=torch.Generator().manual_seed(2), persistent_workers=True)

    loader = make()
    list(loader)
    it = iter(loader)
    head = [plain(next(it)) for _ in range(3)]  # (a checkpoint taken mid-epoch)
    time.sleep(0.2)  # let the thread run ahead
    state = loader.state_dict()
    del it
    assert state["iterator"]["yielded"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    reference = make()
    list(reference)
    second = [plain(b) for b in reference]  # its second epoch
    # (resumed workers start afresh: which worker loads what, and its RNG, are not compared)
    assert [b["i"].tolist() for b in head + tail] == [b["i"].tolist() for b in second]


def test_in_process_cpu_stage_many_epochs():
    base = Baseline()
    kw = dict(batch_size=5, shuffle=True)
    reference = torch_reference(PLAN, **kw)
    loader, epochs, _ = fastload_run(PLAN, device="cpu", **kw)
    assert_same(settled(reference, PLAN), settled(epochs, PLAN))
    del loader
    base.assert_clean()


def test_worker_error_through_the_stage_then_a_new_epoch():
    class Flaky(Numbers):
        def __getitem__(self, i):
            if i == 9:
                raise KeyError("bad sample 9")
            return super().__getitem__(i)

    base = Baseline()
    dataset = Flaky()
    loader = fastload.DataLoader(dataset, batch_size=4, num_workers=2, device="cpu", persistent_workers=True)
    for _ in range(2):  # the error reaches the trainer, and the next epoch runs again
        with pytest.raises(KeyError, match="bad sample 9"):
            list(loader)
        assert not prefetch_threads()
    pids = loader.worker_pids
    del loader
    base.assert_clean(pids)


# -- start methods --------------------------------------------------------------------------------
def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def warm_up(method: str) -> None:
    """Starts the helper processes that outlive a loader (the forkserver, the resource tracker)
    before a baseline is taken: their descriptors are multiprocessing's, not the loader's.
    The forkserver imports fastload once, as a trainer would have it do (if this process has no
    server yet), so that each worker does not import torch afresh."""
    if method == "forkserver":
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload(["fastload", "tests.datasets_for_tests"])
        forkserver.ensure_running()
    if method in ("spawn", "forkserver"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


def assert_started_with(method: str, pids) -> None:
    me = os.getpid()
    for pid in pids:
        if method == "forkserver":
            assert parent_of(pid) != me and "forkserver" in cmdline(parent_of(pid))
        else:
            assert parent_of(pid) == me
            assert ("spawn_main" in cmdline(pid)) == (method == "spawn")


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_start_methods_match_torch(method, persistent):
    warm_up(method)
    base = Baseline()
    kw = dict(batch_size=5, shuffle=True, num_workers=2, persistent_workers=persistent)
    reference = torch_reference([None, None], **kw)  # torch's own start method: the batches do not depend on it
    seen: list[list[int]] = [[], []]

    def watch(loader, epoch, n):
        if n == 1:
            seen[epoch] = loader.worker_pids
            assert_started_with(method, seen[epoch])

    loader, epochs, pids = fastload_run([None, None], watch=watch, multiprocessing_context=method, **kw)
    assert_same(reference, epochs)
    assert (seen[0] == seen[1]) == persistent
    del loader
    base.assert_clean(pids)


@pytest.fixture
def global_start_method():
    """Sets the global start method for one test (``multiprocessing.set_start_method``, which
    ``torch.multiprocessing`` re-exports), restoring whatever it was."""
    old = multiprocessing.get_start_method(allow_none=True)

    def set_method(method):
        multiprocessing.set_start_method(method, force=True)

    yield set_method
    multiprocessing.set_start_method(old, force=True)


def test_default_context_follows_the_global_start_method(global_start_method):
    global_start_method("spawn")
    loader = fastload.DataLoader(Numbers(8), batch_size=4, num_workers=1)
    it = iter(loader)
    next(it)
    assert_started_with("spawn", loader.worker_pids)
    del it, loader


ORPHAN = """
import multiprocessing, os, sys, time
sys.path.insert(0, {root!r})
import fastload
from tests.datasets_for_tests import Numbers

ctx = multiprocessing.get_context("forkserver")
ctx.set_forkserver_preload(["fastload", "tests.datasets_for_tests"])
loader = fastload.DataLoader(Numbers(100000, delay=0.01), batch_size=2, num_workers=2,
                             multiprocessing_context=ctx)
for n, batch in enumerate(loader):
    if n == 2:
        print("ready", *loader.worker_pids, flush=True)
"""


def test_forkserver_workers_exit_when_the_trainer_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN.format(root=ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)  # the workers noticed and exited...
    time.sleep(0.2)
    assert not glob.glob(f"/dev/shm/fastload-{proc.pid}-*")  # ...removing their segments


def test_nothing_left_after_the_whole_file():
    """Runs last in this file: whatever the tests above started is gone."""
    gc.collect()
    assert not prefetch_threads()
    assert not shm_names()


# -- faults at the wrong moment ------------------------------------------------------------
@pytest.mark.parametrize("trial", range(3))
def test_worker_killed_during_a_step_is_named(trial):
    """The trainer holds a batch while a worker dies; releasing the batch then writes to the
    dead worker's pipe. The error names the worker and its signal, not the broken pipe."""
    base = Baseline()
    loader = fastload.DataLoader(Numbers(n=200), batch_size=2, num_workers=2)
    it = iter(loader)
    batch = next(it)
    pid = loader.worker_pids[trial % 2]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)  # the trainer is inside its step
    del batch
    with pytest.raises(RuntimeError, match=rf"pid {pid}\) is killed by signal: SIGKILL"):
        for _ in range(200):
            next(it)
    del it, loader
    base.assert_clean([pid])


def test_ctrl_c_while_workers_start_is_raised_not_lost():
    warm_up("spawn")
    base = Baseline()
    loader = fastload.DataLoader(Numbers(), batch_size=2, num_workers=2, multiprocessing_context="spawn")
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        it = iter(loader)
        time.sleep(2)  # if the interrupt were lost, the loop below would run
        list(it)
    timer.join()
    gc.collect()
    base.assert_clean([])
