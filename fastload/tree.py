"""Walking a batch: nested dicts, lists, tuples and namedtuples around tensor-like leaves."""
from __future__ import annotations

from typing import Any, Callable


def map_tree(obj, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]):
    """Applies ``fn`` to the leaves of nested dicts/lists/tuples/namedtuples, keeping container types."""
    if is_leaf(obj):
        return fn(obj)
    if isinstance(obj, dict):
        items = {k: map_tree(v, is_leaf, fn) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tree(v, is_leaf, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tree(v, is_leaf, fn) for v in obj)
    return obj
