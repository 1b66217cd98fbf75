"""Resume that survives a changed job: other worker counts and world sizes continue the epoch
exactly once; what cannot be honoured is refused; torchdata's StatefulDataLoader cases."""
from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

import fastload
from fastload.shards import ShardDataset
from fastload.writer import ShardWriter

N_SHARDS, PER_SHARD = 7, 9
ALL = list(range(N_SHARDS * PER_SHARD))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "3 workers on 2 cores" advice
        yield


def make_shards(tmp_path, manifest=True):
    writer = ShardWriter(str(tmp_path / "r"), maxcount=PER_SHARD)
    for i in ALL:
        writer.write(f"{i:05d}", {"cls": str(i).encode()})
    writer.close({})
    if not manifest:
        os.remove(tmp_path / "r.manifest.json")
    return str(tmp_path / ("r-{000000..%06d}.tar" % (N_SHARDS - 1)))


def decode(sample):
    return int(sample["cls"])


def as_rank(monkeypatch, rank, world):
    """ShardDataset and the loader see the rank through torch.distributed or, when that is not
    initialised, RANK/WORLD_SIZE: here each rank of a job runs in turn in this process
    (tests/test_distributed.py runs real ranks)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def ids(batches):
    return [i for b in batches for i in b.tolist()]


def make_loader(urls, workers, even="repeat", batch_size=3):
    ds = ShardDataset(urls, shuffle=5, seed=11, transform=decode, even_ranks=even)
    return fastload.DataLoader(ds, batch_size=batch_size, num_workers=workers)


def run_job(monkeypatch, urls, world, workers, steps, even, states=None):
    """Every rank takes ``steps`` batches (None: to the end), in lockstep as DDP does; returns
    the samples each rank got and each rank's state afterwards."""
    got, saved = [], []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        loader = make_loader(urls, workers, even)
        if states is not None:
            loader.load_state_dict(states if len(states) != world else states[rank])
        it = iter(loader)
        batches = list(it) if steps is None else [next(it) for _ in range(steps)]
        got.append(ids(batches))
        saved.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
        del it
    return got, saved


def batches_per_rank(monkeypatch, urls, world, workers, even):
    got, _ = run_job(monkeypatch, urls, world, workers, None, even)
    return len(got[0]) // 3


@pytest.mark.parametrize("even", ["repeat", "drop"])
def test_elastic_resume_every_layout_change(tmp_path, monkeypatch, even):
    """Saved at random points (inside shuffle buffers too), resumed with every other
    workers x world combination: the job's samples are one epoch, each exactly once, apart
    from the evening of ranks (repeat adds, drop leaves out, fewer than world per deal)."""
    urls = make_shards(tmp_path)
    rnd = random.Random(0)
    layouts = [(workers, world) for world in (1, 2, 3) for workers in (0, 1, 2, 3)]
    cases = [(a, b) for a in layouts for b in layouts if a != b]
    rnd.shuffle(cases)
    for (w0, world0), (w1, world1) in cases[:24]:
        steps_max = batches_per_rank(monkeypatch, urls, world0, w0, even)
        steps = rnd.randrange(1, steps_max)
        head, states = run_job(monkeypatch, urls, world0, w0, steps, even)
        tail, _ = run_job(monkeypatch, urls, world1, w1, None, even, states=states)
        counts = Counter(i for part in head + tail for i in part)
        slack = (world0 - 1) + (world1 - 1)
        case = f"{w0} workers x {world0} ranks -> {w1} x {world1}, after {steps} steps"
        if even == "repeat":
            assert set(counts) == set(ALL), case
            assert sum(counts.values()) - len(ALL) <= slack, case
        else:
            assert max(counts.values()) == 1, case
            assert len(ALL) - len(counts) <= slack, case


def test_same_layout_resume_is_exact(tmp_path, monkeypatch):
    urls = make_shards(tmp_path)
    for workers, world in ((0, 1), (2, 1), (3, 2), (2, 3)):
        full, _ = run_job(monkeypatch, urls, world, workers, None, "repeat")
        for steps in (1, 2, 4):
            head, states = run_job(monkeypatch, urls, world, workers, steps, "repeat")
            tail, _ = run_job(monkeypatch, urls, world, workers, None, "repeat", states=states)
            assert [h + t for h, t in zip(head, tail)] == full, (workers, world, steps)


def test_elastic_resume_without_a_manifest_counts_from_headers(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, manifest=False)
    head, states = run_job(monkeypatch, urls, 2, 2, 3, "drop")
    tail, _ = run_job(monkeypatch, urls, 3, 1, None, "drop", states=states)
    counts = Counter(i for part in head + tail for i in part)
    assert max(counts.values()) == 1 and len(ALL) - len(counts) <= 3


def test_changed_world_needs_every_rank(tmp_path, monkeypatch):
    urls = make_shards(tmp_path)
    _, states = run_job(monkeypatch, urls, 2, 1, 2, "repeat")
    as_rank(monkeypatch, 0, 3)
    loader = make_loader(urls, 1)
    with pytest.raises(fastload.ResumeError, match="every rank"):
        loader.load_state_dict(states[0])


def test_another_dataset_is_refused(tmp_path, monkeypatch):
    urls = make_shards(tmp_path)
    _, states = run_job(monkeypatch, urls, 1, 2, 2, "repeat")
    other = ShardDataset(urls, shuffle=5, seed=12, transform=decode)
    with pytest.raises(fastload.ResumeError, match="another dataset"):
        fastload.DataLoader(other, batch_size=3, num_workers=2).load_state_dict(states[0])


class Counting(IterableDataset):
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        yield from range(wid, 40, n)


def test_plain_iterable_refuses_another_worker_count():
    loader = fastload.DataLoader(Counting(), batch_size=4, num_workers=2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    with pytest.raises(fastload.ResumeError, match="same num_workers"):
        fastload.DataLoader(Counting(), batch_size=4, num_workers=3).load_state_dict(state)
    same = fastload.DataLoader(Counting(), batch_size=4, num_workers=2)
    same.load_state_dict(state)
    assert ids(head) + ids(same) == ids(fastload.DataLoader(Counting(), batch_size=4, num_workers=2))


class Range(Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("workers,resume_workers", [(0, 2), (2, 0), (1, 3)])
def test_map_style_resumes_with_another_worker_count(workers, resume_workers):
    def make(w):
        return fastload.DataLoader(Range(), batch_size=4, shuffle=True, num_workers=w,
                                   generator=torch.Generator().manual_seed(5))

    full = ids(make(workers))
    loader = make(workers)
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    resumed = make(resume_workers)
    resumed.load_state_dict(state)
    assert ids(head) + ids(resumed) == full


# -- torchdata StatefulDataLoader semantics (test/stateful_dataloader/test_state_dict.py) -----
@pytest.mark.parametrize("workers", [0, 2])
def test_state_after_a_finished_epoch_starts_the_next_one(workers):
    def make():
        return fastload.DataLoader(Range(), batch_size=5, shuffle=True, num_workers=workers,
                                   generator=torch.Generator().manual_seed(1))

    loader = make()
    list(loader)
    state = loader.state_dict()
    second = ids(loader)
    resumed = make()
    resumed.load_state_dict(state)
    assert ids(resumed) == second and second


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_right_after_load_is_the_loaded_position(workers):
    def make():
        return fastload.DataLoader(Range(), batch_size=4, shuffle=True, num_workers=workers,
                                   generator=torch.Generator().manual_seed(2))

    full = ids(make())
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    middle = make()
    middle.load_state_dict(state)
    again = middle.state_dict()  # a checkpoint taken before iterating again
    final = make()
    final.load_state_dict(again)
    assert ids(head) + ids(final) == full


def test_end_of_epoch_state_with_persistent_workers():
    def make():
        return fastload.DataLoader(Range(), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                                   generator=torch.Generator().manual_seed(3))

    loader = make()
    first = ids(loader)
    state = loader.state_dict()
    second = ids(loader)
    resumed = make()
    resumed.load_state_dict(state)
    assert ids(resumed) == second and first != second


class EpochCounting(IterableDataset):
    """Keeps its own epoch counter and position (torchdata's Stateful protocol): each iter()
    is a new epoch, so replaying a fresh copy would give the wrong epoch's data."""

    def __init__(self):
        self.epoch, self.pos, self.resumed = -1, 0, False

    def __iter__(self):
        if not self.resumed:
            self.epoch, self.pos = self.epoch + 1, 0
        self.resumed = False
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        while self.pos < 12:
            self.pos += 1
            yield 100 * self.epoch + (self.pos - 1) * n + wid

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self.resumed = state["epoch"], state["pos"], True


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_with_its_own_state(workers):
    def make():
        return fastload.DataLoader(EpochCounting(), batch_size=4, num_workers=workers, persistent_workers=workers > 0)

    loader = make()
    ids(loader)
    reference = ids(loader)  # epoch 1
    loader2 = make()
    list(loader2)
    it = iter(loader2)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader2.state_dict()))
    del it
    assert all(s is not None for s in state["iterator"]["dataset_states"])
    resumed = make()
    resumed.load_state_dict(state)
    assert ids(head) + ids(resumed) == reference


class EpochSampler(torch.utils.data.Sampler):
    """A sampler whose order depends on an epoch counter it keeps itself."""

    def __init__(self):
        self.epoch = 0

    def __len__(self):
        return 23

    def __iter__(self):
        order = torch.randperm(23, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.epoch += 1
        return iter(order)

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_with_its_own_state(workers):
    def make():
        return fastload.DataLoader(Range(), batch_size=4, sampler=EpochSampler(), num_workers=workers)

    loader = make()
    ids(loader)
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(loader.state_dict()))
    rest = ids(it)
    resumed = make()
    resumed.load_state_dict(state)
    assert ids(resumed) == rest and ids(head) + rest != ids(make())


class WhoLoads(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.tensor([i, torch.utils.data.get_worker_info().id])


def test_map_style_resume_hands_each_batch_to_the_same_worker():
    def make():
        return fastload.DataLoader(WhoLoads(), batch_size=4, num_workers=3)

    full = [b.tolist() for b in make()]
    for k in (1, 2, 4):
        loader = make()
        it = iter(loader)
        head = [next(it).tolist() for _ in range(k)]
        state = loader.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        assert head + [b.tolist() for b in resumed] == full, k


class SlowFirst(Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i == 0:
            time.sleep(0.5)
        return i


def test_out_of_order_checkpoint_owes_the_slow_batch():
    """in_order=False hands batch 0 (slow) over late; a checkpoint taken before it arrives
    owes exactly it and the undelivered rest — nothing twice, nothing lost."""
    def make():
        return fastload.DataLoader(SlowFirst(), batch_size=2, num_workers=2, in_order=False)

    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(4)]
    assert [0, 1] not in head
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b.tolist() for b in resumed]
    assert sorted(head + tail) == [[i, i + 1] for i in range(0, 24, 2)]
    assert tail[0] != [0, 1]  # still slow: the others overtake it again
