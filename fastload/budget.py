"""Token-budget batches: as many samples as fit in ``max_tokens``, grouped by length.

A batch's cost is what its collated tensors hold: ``batch x longest`` padded (after
``pad_to_multiple_of``) for :class:`~fastload.Qwen2VLCollator`, ``rows x row length`` for
:class:`~fastload.Qwen2VLPackingCollator` (the collator's ``token_planner`` says which). Lengths
come from headers alone — ``dataset.num_tokens(index)`` for map-style datasets,
``transform.num_tokens(sample)`` for a :class:`~fastload.ShardDataset` — so batches are planned
before a pixel is decoded.

Grouping happens inside a bounded lookahead window (``TokenBudget.lookahead`` samples): the
window is sorted by length, cut into batches, and the batches leave in random order. That bounds
memory (a ShardDataset worker holds ``lookahead`` raw samples, compressed image bytes and all)
and keeps the data order random beyond the window: a sample leaves within the window it arrived
in, so the only change to the order is a shuffle inside windows, biased toward putting samples
of similar length together. A larger window pads less and mixes lengths less.

Where batches are formed:

* map-style datasets: :class:`TokenBatchSampler`, in the main process, the whole epoch planned
  up front (so ``len`` is exact and DDP ranks get equal batch counts);
* :class:`~fastload.ShardDataset`: :class:`TokenBatches`, an iterable stage in the workers
  between tar reading and the transform;
* other iterable datasets: :class:`TokenBatches` over their items (``len(item["input_ids"])``).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate as torch_default_collate

from .deferred import defers
from .errors import Skip, resolve, skip_for
from .loader.collate import default_collate
from .loader.fetch import EMPTY
from .loader.resume import ResumeError
from .shards import rank_and_world, worker_and_count

log = logging.getLogger("fastload")

DEFAULT_LOOKAHEAD = 512


class SampleTooLong(ValueError):
    """A sample that no batch within the token budget can hold."""

    cause = "longer than the token budget"


@dataclass(frozen=True)
class TokenBudget:
    """``DataLoader(max_tokens=TokenBudget(16384, lookahead=2048))``; a bare int is
    ``TokenBudget(int)``. ``lookahead``: samples grouped together (memory vs. padding)."""

    max_tokens: int
    lookahead: int = DEFAULT_LOOKAHEAD

    def __post_init__(self):
        if self.max_tokens < 1 or self.lookahead < 1:
            raise ValueError(f"max_tokens and lookahead must be positive, got {self}")


# -- planners: lengths -> batches within the budget ------------------------------------------
class Planner(Protocol):
    """How a collator's batches are cut from lengths (a collator offers its own through
    ``token_planner(max_tokens, max_samples)``; padding to the longest is the default)."""

    def limit(self) -> int:
        """The longest sample a batch can hold."""

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Every index once, in batches within the budget."""


def round_up(n: int, multiple: int | None) -> int:
    """``n`` padded up to a multiple of ``multiple`` (unchanged when None)."""
    return -(-n // multiple) * multiple if multiple else n


def _longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length, ties in their given order (stable): the order both the
    planner and the packing collator pack in, so they agree on rows."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def first_fit_decreasing(lengths: Sequence[int], capacity: int, max_bins: int | None = None,
                         max_items: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Bins of indices whose lengths sum to at most ``capacity``, filled first-fit in
    decreasing length, and the indices left over once ``max_bins`` or ``max_items`` is reached.
    First-fit decreasing uses at most 11/9 of the optimal number of bins (+ 6/9)."""
    bins: list[list[int]] = []
    room: list[int] = []
    left: list[int] = []
    placed = 0
    for i in _longest_first(lengths):
        n = lengths[i]
        target = next((b for b, free in enumerate(room) if n <= free), None)
        full = placed == max_items
        if target is None and not full and n <= capacity and (max_bins is None or len(bins) < max_bins):
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        if target is None or full:
            left.append(i)
            continue
        bins[target].append(i)
        room[target] -= n
        placed += 1
    return bins, left


class PaddedPlanner:
    """Batches padded to their longest sample: ``batch x padded(longest) <= max_tokens``."""

    def __init__(self, max_tokens: int, max_samples: int, pad_to_multiple_of: int | None = None):
        self.max_tokens, self.max_samples, self.multiple = max_tokens, max_samples, pad_to_multiple_of

    def limit(self) -> int:
        """The longest sample a batch can hold."""
        return self.max_tokens - self.max_tokens % self.multiple if self.multiple else self.max_tokens

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Longest first, each batch as many of the next ones as the budget allows: every batch
        holds samples of neighbouring lengths."""
        batches: list[list[int]] = []
        for i in _longest_first(lengths):
            batch = batches[-1] if batches else None
            if batch is None or len(batch) == self.max_samples or (
                    (len(batch) + 1) * round_up(lengths[batch[0]], self.multiple) > self.max_tokens):
                batches.append([i])
            else:
                batch.append(i)
        return batches


class PackedPlanner:
    """Batches packed into at most ``max_tokens // row_length`` rows of ``row_length`` tokens,
    first-fit decreasing; the packing collator packs each batch into the same rows."""

    def __init__(self, max_tokens: int, max_samples: int, row_length: int | None = None,
                 pad_to_multiple_of: int | None = None):
        capacity = row_length or max_tokens - (max_tokens % pad_to_multiple_of if pad_to_multiple_of else 0)
        if capacity > max_tokens or capacity < 1:
            raise ValueError(f"max_tokens={max_tokens} holds no row of max_length={row_length}")
        self.capacity, self.rows, self.max_samples = capacity, max_tokens // capacity, max_samples

    def limit(self) -> int:
        return self.capacity

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """First-fit decreasing into ``rows`` bins, again and again over what is left. Each
        batch lists its samples longest first, the order the collator packs them in, so the
        collator's first-fit finds the same rows."""
        batches, todo = [], _longest_first(lengths)
        while todo:
            bins, left = first_fit_decreasing([lengths[i] for i in todo], self.capacity, self.rows,
                                              self.max_samples)
            batches.append([todo[i] for i in sorted(i for b in bins for i in b)])
            todo = [todo[i] for i in sorted(left)]
        return batches


def planner_for(collate_fn, max_tokens: int, max_samples: int) -> Planner:
    """The collator's own planner (``token_planner``), else padding to the longest sample."""
    make = getattr(collate_fn, "token_planner", None)
    if make is not None:
        return make(max_tokens, max_samples)
    return PaddedPlanner(max_tokens, max_samples, getattr(collate_fn, "pad_to_multiple_of", None))


def plan_window(items: list, lengths: list[int], planner: Planner, rng: random.Random | None) -> list[list]:
    """One lookahead window cut into batches (of ``items``), in random order when ``rng``."""
    batches = [[items[i] for i in batch] for batch in planner.plan(lengths)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def too_long(length: int, planner: Planner) -> SampleTooLong | None:
    """The error for a sample no batch of ``planner`` can hold, else None."""
    if length <= planner.limit():
        return None
    return SampleTooLong(f"a sample of {length} tokens is longer than the {planner.limit()} one batch "
                         "can hold (raise max_tokens, or lower the transform's cutoff_len)")


# -- map-style: a batch sampler ------------------------------------------------------------
class TokenBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices within a token budget, for map-style datasets.

    ``lengths[i]`` is sample ``i``'s token count (``DataLoader(max_tokens=...)`` reads
    ``dataset.num_tokens(i)`` once per sample when the loader is built: make it cheap, e.g.
    ``transform.num_tokens(record)`` from headers, or a stored length). Each epoch the indices
    are shuffled, taken ``lookahead`` at a time, each window cut into batches by ``planner``.

    Each epoch's order is drawn from ``(seed, epoch)``: ``seed`` given, or drawn once from
    ``generator`` (torch's global RNG when None); the epoch counts up by itself with every
    iteration, or is set with :meth:`set_epoch` as for ``DistributedSampler``. So the plan of the
    coming epoch is known before it starts (``len`` is exact) and a resumed epoch is planned
    again exactly (the state holds seed and epoch). With ``num_replicas > 1`` every rank plans
    the same epoch (give them the same ``seed``) and takes every ``num_replicas``-th batch; ranks
    get equal counts: the last batches are repeated from the start (or, with ``drop_last``, the
    surplus left out).
    """

    def __init__(self, lengths: Sequence[int], planner: Planner, *, lookahead: int = DEFAULT_LOOKAHEAD,
                 shuffle: bool = True, seed: int | None = None, generator: torch.Generator | None = None,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False,
                 on_error: str = "raise"):
        rank_now, world_now = rank_and_world()
        self.num_replicas = world_now if num_replicas is None else num_replicas
        self.rank = rank_now if rank is None else rank
        if self.num_replicas > 1 and shuffle and seed is None:
            raise ValueError("a TokenBatchSampler shared by several ranks needs a seed (every rank must "
                             "draw the same order)")
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        self.planner, self.lookahead, self.shuffle, self.seed = planner, lookahead, shuffle, seed
        self.drop_last = drop_last
        self.epoch = self._next = 0  # the epoch in progress, and the one the next iteration plans
        self.lengths = list(lengths)
        self.usable = self._usable(on_error)
        self._plans: dict[int, list[list[int]]] = {}

    def _usable(self, on_error: str) -> list[int]:
        """Indices a batch can hold; the others raise (``on_error="raise"``) or are left out,
        counted in ``skipped``."""
        usable, self.skipped = [], 0
        for i, n in enumerate(self.lengths):
            exc = too_long(n, self.planner)
            if exc is None:
                usable.append(i)
                continue
            skip_for(exc, None, f"sample {i}", on_error)
            self.skipped += 1
        if not usable and self.lengths:
            raise ValueError(f"no sample fits the token budget: the shortest is {min(self.lengths)} "
                             f"tokens, a batch holds at most {self.planner.limit()}")
        return usable

    def set_epoch(self, epoch: int) -> None:
        self._next = epoch

    def state_dict(self) -> dict:
        """The epoch the next iteration plans (the loader saves this as an epoch begins)."""
        return {"epoch": self._next, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration plans the saved epoch again (the loader then passes over the
        batches that were delivered)."""
        if state["num_replicas"] != self.num_replicas:
            raise ResumeError(f"token batches planned for {state['num_replicas']} ranks cannot be resumed "
                              f"on {self.num_replicas}: each rank's share depends on the world size")
        self.seed, self._next = state["seed"], state["epoch"]

    def _plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        if epoch not in self._plans:
            rng = random.Random(self.seed * 1_000_003 + epoch) if self.shuffle else None
            order = list(self.usable)
            if rng is not None:
                rng.shuffle(order)
            batches = [b for k in range(0, len(order), self.lookahead)
                       for b in plan_window(order[k:k + self.lookahead],
                                            [self.lengths[i] for i in order[k:k + self.lookahead]],
                                            self.planner, rng)]
            self._plans = {e: p for e, p in self._plans.items() if e == self.epoch}
            self._plans[epoch] = self._share(batches)
        return self._plans[epoch]

    def _share(self, batches: list[list[int]]) -> list[list[int]]:
        world = self.num_replicas
        if world == 1 or not batches:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % world]
        else:
            pad = -len(batches) % world
            batches = batches + (batches * (pad // len(batches) + 1))[:pad]
        return batches[self.rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: torch creates the iterator of its first epoch twice (workers), and only
        # the one that is run counts the epoch.
        self.epoch, self._next = self._next, self._next + 1
        yield from self._plan(self.epoch)

    def __len__(self) -> int:
        """Batches of the coming epoch (the one the next iteration plans)."""
        return len(self._plan(self._next))


# -- iterable datasets: a stage in the workers -------------------------------------------------
class _Filler:
    """Stands in the unused positions of a batch (see :class:`TokenBatches`)."""

    def __repr__(self) -> str:
        return "FILLER"


FILLER = _Filler()


class TokenBatches(IterableDataset):
    """An iterable dataset regrouped into token-budget batches, inside each worker.

    The loader's fetcher takes a fixed ``batch_size`` stream positions per batch (that is how
    batch boundaries, skips and resume positions stay put), so each planned batch leaves as
    exactly ``batch_size`` positions: its samples, any skips waiting to be counted, then
    ``FILLER`` positions that the collate wrapper drops. A filler carries the origin of its
    batch's first sample, so a batch's origins are exactly its samples' (a set: the duplicate
    is harmless) and resume stays exactly-once: what sits in the lookahead window when a
    checkpoint is taken was not delivered, and comes again after a resume.

    Over :class:`~fastload.ShardDataset` (``raw_stream``), samples are grouped raw, by
    ``transform.num_tokens``, and transformed as their batch leaves: the window holds compressed
    bytes, never decoded pixels. Other iterables are grouped by their items' length
    (``len(item["input_ids"])``, else ``len(item)``), after their own transform.
    """

    def __init__(self, dataset, planner: Planner, batch_size: int, lookahead: int = DEFAULT_LOOKAHEAD,
                 on_error: str | None = None):
        if hasattr(dataset, "raw_stream") and not callable(getattr(dataset.transform, "num_tokens", None)):
            raise ValueError("max_tokens over a ShardDataset needs a transform with num_tokens(sample), "
                             "as Qwen2VLTransform has: lengths come from headers before decoding")
        self.dataset, self.planner, self.batch_size, self.lookahead = dataset, planner, batch_size, lookahead
        self._on_error = on_error

    # what the loader reads off its dataset, forwarded
    @property
    def on_error(self) -> str | None:
        return resolve(getattr(self.dataset, "on_error", None), self._on_error)

    @property
    def epoch(self):
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def fingerprint(self) -> dict | None:
        fp = getattr(self.dataset, "fingerprint", None)
        return fp() if callable(fp) else None

    def __len__(self) -> int:
        raise TypeError("token-budget batches of an iterable dataset have no length known in advance")

    @property
    def stream(self) -> Callable:
        """The loader's stream protocol, only where the dataset has one (ShardDataset)."""
        if not hasattr(self.dataset, "raw_stream"):
            raise AttributeError("stream")
        return self._stream

    def _rng(self) -> random.Random:
        rank, _ = rank_and_world()
        worker, _ = worker_and_count()
        seed, epoch = getattr(self.dataset, "seed", 0), getattr(self.dataset, "epoch", 0)
        return random.Random(f"{seed}/{epoch}/{rank}/{worker}/token-batches")

    def _stream(self, on_error: str | None = None, resume: dict | None = None, defer: bool = False
                ) -> Iterator[tuple]:
        policy = resolve(getattr(self.dataset, "on_error", None), on_error)
        measured = self._measure_raw(self.dataset.raw_stream(policy, resume), policy)
        for group in self._groups(measured):
            real = [event for event in group if event[1] is not FILLER]
            yield from self.dataset.transformed(iter(real), policy, defer)
            yield from group[len(real):]

    def _measure_raw(self, events: Iterable[tuple], policy: str) -> Iterator[tuple[tuple, int | None]]:
        """``(event, length)``, or ``(skip event, None)`` for a sample that is bad or too long.

        A transform with ``tokenized(sample)`` (:class:`~fastload.Qwen2VLTransform`) gives the
        sample back with its tokens attached; that form waits in the window, so transforming it
        when its batch leaves does not tokenize it again."""
        transform = self.dataset.transform
        tokenized = getattr(transform, "tokenized", None)
        own = resolve(getattr(transform, "on_error", None), policy)
        for origin, item in events:
            if isinstance(item, Skip):
                yield (origin, item), None
                continue
            what = f"sample {item.get('__key__')!r} of {origin[0]}"
            try:
                if tokenized is None:
                    length = transform.num_tokens(item)
                else:
                    item = tokenized(item)
                    length = item.num_tokens
            except Exception as err:  # a bad record: the transform would fail on it too
                yield (origin, skip_for(err, origin[0], what, own)), None
                continue
            exc = too_long(length, self.planner)
            if exc is None:
                yield (origin, item), length
            else:
                yield (origin, skip_for(exc, origin[0], what, policy)), None

    def __iter__(self) -> Iterator:
        for group in self._groups(self._measure_items(self.on_error)):
            for _, item in group:
                yield item

    def _measure_items(self, policy: str) -> Iterator[tuple[tuple, int]]:
        """Items of a plain iterable with their lengths; one too long raises or, under
        ``skip``/``warn``, is left out (a plain iterable has no channel to count it)."""
        for item in self.dataset:
            length = len(item["input_ids"]) if isinstance(item, dict) else len(item)
            exc = too_long(length, self.planner)
            if exc is None:
                yield (None, item), length
            else:
                skip_for(exc, None, "an item of the iterable dataset", policy)

    def _groups(self, measured: Iterable[tuple[tuple, int | None]]) -> Iterator[list[tuple]]:
        """Planned batches as groups of exactly ``batch_size`` events: samples, waiting skips, fillers."""
        rng, window, skips = self._rng(), [], []
        for event, length in measured:
            if length is None:
                skips.append(event)
            else:
                window.append((event, length))
            if len(skips) == self.batch_size:
                yield self._filled(skips)
                skips = []
            if len(window) == self.lookahead:
                yield from self._window_groups(window, skips, rng)
                window = []
        yield from self._window_groups(window, skips, rng)
        if skips:
            yield self._filled(skips)

    def _window_groups(self, window: list, skips: list, rng: random.Random) -> Iterator[list[tuple]]:
        """The window's batches, each taking along as many waiting skips as it has room for."""
        for batch in plan_window([e for e, _ in window], [n for _, n in window], self.planner, rng):
            room = self.batch_size - len(batch)
            batch += skips[:room]
            del skips[:room]
            yield self._filled(batch)

    def _filled(self, events: list[tuple]) -> list[tuple]:
        return events + [(events[0][0], FILLER)] * (self.batch_size - len(events))


class DropFillers:
    """The loader's collate function for :class:`TokenBatches`: collates a batch's samples,
    leaving out its fillers; a batch of skips alone is the fetcher's EMPTY (not delivered)."""

    def __init__(self, collate_fn):
        self.collate_fn = default_collate if collate_fn in (None, torch_default_collate) else collate_fn
        if defers(self.collate_fn):
            self.collate_deferred = partial(self._collate, self.collate_fn.collate_deferred)

    def __call__(self, items: list):
        return self._collate(self.collate_fn, items)

    @staticmethod
    def _collate(collate_fn, items: list):
        data = [x for x in items if x is not FILLER]
        return collate_fn(data) if data else EMPTY


# -- DataLoader(max_tokens=...) ------------------------------------------------------------
@dataclass
class TokenBatching:
    """What ``DataLoader(max_tokens=...)`` hands torch's constructor instead of the user's
    dataset/batching arguments, and what it reports."""

    dataset: object
    batch_size: int | None
    batch_sampler: Sampler | None
    collate_fn: object
    skips: tuple | None = None  # samples no batch can hold, for loader.stats (map-style: counted once)


def token_batching(dataset, budget: int | TokenBudget, *, batch_size, shuffle, sampler, batch_sampler,
                   drop_last: bool, collate_fn, generator, on_error: str) -> TokenBatching:
    """Builds the sampler (map-style) or worker stage (iterable) for ``max_tokens``."""
    budget = budget if isinstance(budget, TokenBudget) else TokenBudget(budget)
    if not batch_size or batch_size < 2:
        raise ValueError("max_tokens needs batch_size >= 2: the most samples one batch may hold "
                         "(fairseq's --max-tokens with --batch-size)")
    if sampler is not None or batch_sampler is not None:
        raise ValueError("max_tokens plans its own batches: pass no sampler or batch_sampler")
    planner = planner_for(collate_fn, budget.max_tokens, batch_size)
    if isinstance(dataset, IterableDataset):
        if drop_last:
            raise ValueError("drop_last has no meaning for token-budget batches of an iterable dataset")
        stage = TokenBatches(dataset, planner, batch_size, budget.lookahead, on_error)
        return TokenBatching(stage, batch_size, None, DropFillers(collate_fn))
    if not callable(getattr(dataset, "num_tokens", None)):
        raise ValueError("max_tokens with a map-style dataset needs dataset.num_tokens(index): each "
                         "sample's token count, known without loading it")
    _, world = rank_and_world()
    sampler = TokenBatchSampler([dataset.num_tokens(i) for i in range(len(dataset))], planner,
                                lookahead=budget.lookahead, shuffle=bool(shuffle),
                                seed=0 if world > 1 else None, generator=generator, drop_last=drop_last,
                                on_error=on_error)
    skips = (sampler.skipped, {SampleTooLong.cause: sampler.skipped}, {}) if sampler.skipped else None
    return TokenBatching(dataset, 1, sampler, collate_fn, skips)


# -- DDP over iterable datasets: every rank stops at the same step ---------------------------------
class EvenSteps:
    """Ends every rank's epoch at the step where the first rank runs out.

    How many token batches a stream gives depends on its samples' lengths, so DDP ranks with
    equal sample shares still differ by a few batches. After each batch, one ``all_reduce(MIN)``
    of "I have a batch" over a gloo group (CPU: no GPU sync) tells every rank whether all have
    one; when one does not, all stop, and a rank that had a batch left leaves it (and the rest
    of its epoch) out. Every rank must iterate its loader in step, as DDP training does.
    """

    def __init__(self, iterator, group):
        self.iterator, self.group = iterator, group

    def __iter__(self) -> EvenSteps:
        return self

    def __next__(self):
        batch = next(self.iterator, EMPTY)
        have = torch.tensor([0 if batch is EMPTY else 1])
        dist.all_reduce(have, op=dist.ReduceOp.MIN, group=self.group)
        if have.item() == 0:
            if batch is not EMPTY:
                log.warning("fastload: rank %d leaves the rest of its epoch out: another rank ran out of "
                            "token batches first", dist.get_rank())
            raise StopIteration
        return batch


def even_steps_group():
    """The process group :class:`EvenSteps` reduces over (None: no distributed job). A
    collective call: every rank makes it at its first epoch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
