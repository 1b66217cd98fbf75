"""Distributed training with real torch.distributed: gloo, 2 and 3 ranks x 2 workers on this
machine, an all_reduce after every batch (a rank that runs out early shows as a timeout), two
epochs reshuffled by set_epoch, and a job resumed with another world size."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import warnings
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

import fastload
from fastload.shards import ShardDataset
from fastload.writer import ShardWriter

N_SHARDS, PER_SHARD = 5, 7  # 35 samples: whole shards dealt to 2 ranks would give 21 vs 14
ALL = list(range(N_SHARDS * PER_SHARD))
COLLECTIVE_TIMEOUT_S = 20


def make_shards(tmp_path):
    writer = ShardWriter(str(tmp_path / "d"), maxcount=PER_SHARD)
    for i in ALL:
        writer.write(f"{i:05d}", {"cls": str(i).encode()})
    writer.close({})
    return str(tmp_path / ("d-{000000..%06d}.tar" % (N_SHARDS - 1)))


def decode(sample):
    return int(sample["cls"])


class Range(Dataset):
    def __len__(self):
        return len(ALL)

    def __getitem__(self, i):
        return i


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_loader(job: dict):
    if job["kind"] == "map":
        ds = Range()
        sampler = DistributedSampler(ds, shuffle=True, seed=3)
        return fastload.DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2), sampler
    ds = ShardDataset(job["urls"], shuffle=4, seed=3, transform=decode, even_ranks=job["even"])
    return fastload.DataLoader(ds, batch_size=3, num_workers=2), ds


def run_epochs(loader, epoch_owner, job: dict) -> list[list[int]]:
    """Each epoch's samples on this rank; ``job["stop_after"]`` batches then a checkpoint."""
    epochs = []
    for epoch in range(job["epochs"]):
        epoch_owner.set_epoch(epoch + job.get("first_epoch", 0))
        seen, ones = [], torch.ones(1)
        for step, batch in enumerate(loader):
            dist.all_reduce(ones)  # every rank must reach every step
            seen += batch.tolist()
            if step + 1 == job.get("stop_after"):
                with open(os.path.join(job["out"], f"state{dist.get_rank()}.json"), "w") as f:
                    json.dump(loader.state_dict(), f)
                break
        epochs.append(seen)
    return epochs


def rank_main(rank: int, world: int, port: int, job: dict) -> None:
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        loader, owner = make_loader(job)
        if job.get("resume_from"):
            states = [json.load(open(os.path.join(job["resume_from"], f"state{r}.json")))
                      for r in range(job["resume_world"])]
            loader.load_state_dict(states)
        epochs = run_epochs(loader, owner, job)
        with open(os.path.join(job["out"], f"rank{rank}.json"), "w") as f:
            json.dump(epochs, f)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job: dict) -> list[list[list[int]]]:
    """Runs ``world`` real ranks (forked, each with 2 loader workers); their epochs' samples."""
    os.makedirs(job["out"], exist_ok=True)
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, job)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=COLLECTIVE_TIMEOUT_S + 40)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed or hung in a collective"
    return [json.load(open(os.path.join(job["out"], f"rank{r}.json"))) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("even", ["repeat", "drop"])
def test_shards_every_rank_same_batches_each_sample_once(tmp_path, world, even):
    job = {"kind": "shards", "urls": make_shards(tmp_path), "even": even, "epochs": 2, "out": str(tmp_path)}
    ranks = run_ranks(world, job)
    per_rank = -(-len(ALL) // world) if even == "repeat" else len(ALL) // world
    for epoch in range(2):
        samples = [r[epoch] for r in ranks]
        assert [len(s) for s in samples] == [per_rank] * world  # in step: no rank waited
        counts = Counter(i for s in samples for i in s)
        if even == "repeat":  # like DistributedSampler: the first samples again, fewer than world
            assert set(counts) == set(ALL) and sum(counts.values()) - len(ALL) < world
        else:  # at most world - 1 left out, nothing doubled
            assert max(counts.values()) == 1 and len(ALL) - len(counts) < world
    assert ranks[0][0] != ranks[0][1]  # set_epoch reshuffled


@pytest.mark.parametrize("world", [2, 3])
def test_map_style_with_distributed_sampler(tmp_path, world):
    ranks = run_ranks(world, {"kind": "map", "epochs": 2, "out": str(tmp_path)})
    for epoch in range(2):
        samples = [r[epoch] for r in ranks]
        assert len({len(s) for s in samples}) == 1
        assert set(i for s in samples for i in s) == set(ALL)
    sampler_order = []
    for rank in range(world):  # exactly torch's DistributedSampler order
        sampler = DistributedSampler(Range(), num_replicas=world, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        sampler_order.append(list(sampler))
    assert [r[1] for r in ranks] == sampler_order


def test_resume_with_another_world_size(tmp_path):
    """A 2-rank job checkpoints after 3 steps; a 3-rank job continues from both ranks' states."""
    urls = make_shards(tmp_path)
    first = run_ranks(2, {"kind": "shards", "urls": urls, "even": "drop", "epochs": 1, "stop_after": 3,
                          "out": str(tmp_path / "a")})
    rest = run_ranks(3, {"kind": "shards", "urls": urls, "even": "drop", "epochs": 1,
                         "resume_from": str(tmp_path / "a"), "resume_world": 2, "out": str(tmp_path / "b")})
    assert [len(r[0]) for r in first] == [9, 9]
    assert len({len(r[0]) for r in rest}) == 1
    counts = Counter(i for r in first + rest for i in r[0])
    assert max(counts.values()) == 1  # nothing doubled
    assert len(ALL) - len(counts) <= (2 - 1) + (3 - 1)  # only what evening drops
