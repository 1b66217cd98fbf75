"""An epoch's progress as a set, not a cursor: which samples of which shard the trainer has.

A sample is named by its *origin* ``(url, index, copy)``: its shard, its position among
that shard's samples, and ``copy > 0`` for a repeat added to even out DDP ranks. Stored
this way, the rest of an epoch ("every sample not yet delivered") can be dealt out again
to any number of workers and ranks, and a checkpoint says honestly what was consumed.
Delivered positions of a shard are kept as sorted ranges, so the state stays small: a
prefix per finished or half-read shard plus the holes a shuffle buffer leaves.
"""
from __future__ import annotations

import bisect

Origin = tuple  # (url: str, index: int, copy: int)


class IndexSet:
    """A set of non-negative ints as sorted, disjoint, non-touching ``[start, stop)`` ranges."""

    def __init__(self, ranges: list[list[int]] | None = None):
        self.starts: list[int] = []
        self.stops: list[int] = []
        for a, b in ranges or ():
            self.add_range(a, b)

    def __contains__(self, i: int) -> bool:
        k = bisect.bisect_right(self.starts, i) - 1
        return k >= 0 and i < self.stops[k]

    def __len__(self) -> int:
        return sum(b - a for a, b in zip(self.starts, self.stops))

    def add(self, i: int) -> None:
        self.add_range(i, i + 1)

    def add_range(self, a: int, b: int) -> None:
        if a >= b:
            return
        lo = bisect.bisect_left(self.stops, a)  # first range that ends at or after a
        hi = bisect.bisect_right(self.starts, b)  # ranges starting at or before b touch
        if lo < hi:
            a, b = min(a, self.starts[lo]), max(b, self.stops[hi - 1])
        self.starts[lo:hi] = [a]
        self.stops[lo:hi] = [b]

    def gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, stop)`` not in the set, in order."""
        out, pos = [], start
        k = max(bisect.bisect_right(self.starts, start) - 1, 0)
        for a, b in zip(self.starts[k:], self.stops[k:]):
            if a >= stop:
                break
            if a > pos:
                out.append((pos, min(a, stop)))
            pos = max(pos, b)
        if pos < stop:
            out.append((pos, stop))
        return out

    def ranges(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self.starts, self.stops)]


class Progress:
    """Delivered origins of one epoch (of one rank, or merged over several)."""

    def __init__(self):
        self.delivered: dict[str, IndexSet] = {}
        self.copies: set[Origin] = set()

    def add(self, origin: Origin) -> None:
        url, index, copy = origin
        if copy:
            self.copies.add((url, index, copy))
        else:
            self.delivered.setdefault(url, IndexSet()).add(index)

    def __contains__(self, origin: Origin) -> bool:
        url, index, copy = origin
        if copy:
            return (url, index, copy) in self.copies
        done = self.delivered.get(url)
        return done is not None and index in done

    def done(self, url: str) -> IndexSet:
        return self.delivered.get(url) or IndexSet()

    def count(self) -> int:
        return sum(len(s) for s in self.delivered.values()) + len(self.copies)

    def state(self) -> dict:
        """Plain lists and dicts: JSON-serializable."""
        return {"delivered": {url: s.ranges() for url, s in self.delivered.items()},
                "copies": sorted([list(o) for o in self.copies])}

    @classmethod
    def from_states(cls, *states: dict) -> "Progress":
        """One progress from one state, or the union of several ranks' states."""
        out = cls()
        for state in states:
            for url, ranges in state["delivered"].items():
                target = out.delivered.setdefault(url, IndexSet())
                for a, b in ranges:
                    target.add_range(a, b)
            out.copies.update(tuple(o) for o in state["copies"])
        return out
