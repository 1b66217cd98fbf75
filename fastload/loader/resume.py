"""Turning saved loader states into what the next iterator does: continue exactly, deal the
rest of the epoch out again, or refuse.

A state records what it depends on (the dataset's fingerprint, epoch, world size, rank,
worker count). Resumed into the same layout, the epoch continues with exactly the batches
the uninterrupted run would have produced. Into another worker count or world size, a
dataset that names its samples (``ShardDataset``: origins, :mod:`fastload.progress`) deals
out what is left, each sample exactly once; for another world size that needs every rank's
state (``loader.load_state_dict([rank0_state, rank1_state, ...])``). Where the job changed
in a way that cannot be honoured, it raises :class:`ResumeError` instead of repeating data.
"""
from __future__ import annotations

from torch.utils.data import DistributedSampler

from ..shards import rank_and_world


class ResumeError(ValueError):
    """A saved loader state that cannot be resumed here without losing or repeating samples."""


def layout(num_workers: int) -> dict:
    rank, world = rank_and_world()
    return {"world": world, "rank": rank, "workers": max(1, num_workers)}


def fingerprint(dataset) -> dict | None:
    fp = getattr(dataset, "fingerprint", None)
    return fp() if callable(fp) else None


def _own_state(states: list[dict], now: dict) -> dict | None:
    if len(states) == 1:
        return states[0]
    return next((s for s in states if s["layout"]["rank"] == now["rank"]
                 and s["layout"]["world"] == now["world"]), None)


def _check_dataset(states: list[dict], loader) -> None:
    expected = fingerprint(loader.dataset)
    for state in states:
        if state.get("fastload") != 2:
            raise ResumeError("this loader state was saved by another fastload version")
        if state["dataset"] != expected:
            raise ResumeError(f"the loader state was saved for another dataset ({state['dataset']}), "
                              f"not this one ({expected}): refusing to resume into it")
    if len({s["dataset_epoch"] for s in states}) > 1:
        raise ResumeError("the ranks' states are from different epochs")


def _elastic(states: list[dict], own: dict | None, now: dict) -> dict:
    """The rest of a ShardDataset epoch, dealt out to a new layout."""
    old_world = states[0]["layout"]["world"]
    if old_world == now["world"] and own is not None:
        return {"mode": "rank", "progress": [own["iterator"]["progress"]]}
    ranks = sorted(s["layout"]["rank"] for s in states)
    if ranks != list(range(old_world)) or any(s["layout"]["world"] != old_world for s in states):
        raise ResumeError(f"resuming a {old_world}-rank run with {now['world']} ranks needs every rank's "
                          f"state: loader.load_state_dict([state_rank0, ..., state_rank{old_world - 1}]) "
                          f"(got ranks {ranks})")
    return {"mode": "all", "progress": [s["iterator"]["progress"] for s in states]}


def plan(saved: dict | list[dict], loader) -> dict | None:
    """What the next iterator of ``loader`` must do to continue from ``saved``; None for a
    fresh epoch. Raises :class:`ResumeError` where that cannot be done exactly once."""
    states = list(saved) if isinstance(saved, (list, tuple)) else [saved]
    _check_dataset(states, loader)
    now = layout(loader.num_workers)
    own = _own_state(states, now)
    base = own or states[0]
    it = base["iterator"]
    if it is None:
        return None
    if it["finished"]:
        return {"finished": True, "base_seed": it["base_seed"], "rng_now": it["rng_now"]}
    same = own is not None and own["layout"] == now
    resume = {"mode": "exact", "base_seed": it["base_seed"], "epoch_rng": it["epoch_rng"],
              "yielded": it["yielded"], "next_worker": it.get("next_worker", 0),
              "progress": [it["progress"]] if "progress" in it else None, "batches": it.get("batches"),
              "sampler_states": it["sampler_states"], "dataset_states": it["dataset_states"],
              "batches_done": it.get("batches_done")}
    if same:
        return resume
    kind = it["kind"]
    if any(s is not None for s in it["dataset_states"]):
        raise ResumeError(f"the dataset's own state_dict() was saved per worker with {base['layout']}: "
                          f"it cannot be dealt out to {now}; resume with the same num_workers and world size")
    if kind == "map":
        if own is None or (own["layout"]["world"] != now["world"]
                           and isinstance(loader.sampler, DistributedSampler)):
            raise ResumeError("a map-style epoch drawn by DistributedSampler cannot be resumed with another "
                              "world size: its order depends on the number of ranks")
        # the sampler's order does not depend on the worker count
        return {**resume, "next_worker": 0, "batches": None}
    if kind == "stream":
        return {**resume, **_elastic(states, own, now), "yielded": 0, "next_worker": 0, "batches": None}
    raise ResumeError(f"{type(loader.dataset).__name__} splits itself across workers and ranks, so a "
                      f"position saved with {base['layout']} cannot be continued with {now}; resume with "
                      "the same num_workers and world size (ShardDataset can change both)")
