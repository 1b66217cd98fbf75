"""The error policy: one setting, applied per sample, every skip counted by cause and shard.

A user sets ``on_error`` once, on the loader; the dataset and its transform inherit it unless
they set their own (the innermost explicit setting wins). What a skip costs is fixed by
where the fault is: a bad record, corrupt member, undecodable image or failed kernel call
costs that sample; a truncated or unreadable shard costs the rest of that shard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("fastload")

ON_ERROR = ("raise", "skip", "warn")


def check_policy(on_error: str | None, allow_none: bool = True) -> str | None:
    if on_error is None and allow_none:
        return None
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def resolve(*policies: str | None) -> str:
    """The innermost explicit policy (pass innermost first); ``"raise"`` when none is set."""
    return next((p for p in policies if p is not None), "raise")


@dataclass(frozen=True)
class Skip:
    """A sample the policy left out, in place of the sample: streams carry it so that batch
    boundaries and resume positions do not depend on how much of the data is bad."""

    cause: str
    shard: str | None = None
    message: str = ""


def skip_for(exc: BaseException, shard: str | None, what: str, policy: str, cause: str | None = None) -> Skip:
    """Applies ``policy`` to ``exc``: re-raises it, or returns the :class:`Skip` to count
    (``cause``: the exception's own ``cause``, else its class name)."""
    if policy == "raise":
        raise exc
    skip = Skip(cause or getattr(exc, "cause", type(exc).__name__), shard, str(exc))
    if policy == "warn":
        log.warning("fastload: skipping %s (%s): %s", what, skip.cause, exc)
    return skip


class SkipCounts:
    """Skips by cause and by shard; ``total`` is what ``loader.stats["skipped"]`` reports."""

    def __init__(self):
        self.total = 0
        self.by_cause: dict[str, int] = {}
        self.by_shard: dict[str, int] = {}

    def add(self, skip: Skip, n: int = 1) -> None:
        self.total += n
        self.by_cause[skip.cause] = self.by_cause.get(skip.cause, 0) + n
        if skip.shard is not None:
            self.by_shard[skip.shard] = self.by_shard.get(skip.shard, 0) + n

    def take(self) -> tuple[int, dict, dict] | None:
        """The counts since the last call (None when there are none), and resets them: what a
        worker reports with each batch."""
        if not self.total:
            return None
        out = (self.total, self.by_cause, self.by_shard)
        self.__init__()
        return out


def merge_counts(stats: dict, delta: tuple[int, dict, dict] | None) -> None:
    """Adds a worker's reported counts into ``loader.stats``."""
    if delta is None:
        return
    total, by_cause, by_shard = delta
    stats["skipped"] += total
    for key, part in (("by_cause", by_cause), ("by_shard", by_shard)):
        target = stats.setdefault(key, {})
        for name, n in part.items():
            target[name] = target.get(name, 0) + n
