"""When a stage's C loop may use a state map directly instead of through Python calls."""

from __future__ import annotations

from typing import Any, TypeGuard


def plain_reads(state: object) -> TypeGuard[dict[Any, Any]]:
    """Is `state` a dict whose reads are dict's own (a plain dict, or the saved state's change-tracking dict)?
    Then C code may read it directly and write it through `__setitem__`, exactly as Python code would; a faust
    table, or a dict subclass with its own reads, keeps the Python path."""
    if not isinstance(state, dict):
        return False
    t = type(state)
    return t.get is dict.get and t.__getitem__ is dict.__getitem__ and t.__contains__ is dict.__contains__


def written_keys(state: object) -> set[Any] | None:
    """The set a saved state's change-tracking dict notes written keys in, or None for any other map.

    Given it, C code writes with dict's own setitem and notes the key itself, exactly as the tracking
    dict's `__setitem__` does, without a Python call per write (one per alert with a cooldown)."""
    from pipeline.state.store import TrackedDict

    return state.changed if type(state) is TrackedDict else None
