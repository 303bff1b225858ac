"""Which channel names a config may use, and the check that every `channels:` list uses them.

A misspelled channel would silently drop every event, so it is a config error.
Plugins that emit their own channels declare them (`channels = ("x",)` on the
class, or a top-level `channels:` list in the config).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.errors import suggest
from pipeline.events import ALIASES, LIFECYCLE, LIFECYCLE_PREFIX

if TYPE_CHECKING:
    from pipeline.config import StageSpec, _Checker
    from pipeline.yamlpos import Path_

LIFECYCLE_STATES = ("created", "starting", "active", "stopping", "stopped", "exported", "failed")
BUILTIN_CHANNELS = frozenset({"transcript", "visual_index", "audio_index", "alert", "metrics", LIFECYCLE,
                              *ALIASES, *(LIFECYCLE_PREFIX + s for s in LIFECYCLE_STATES)})


def known_channels(specs: Iterable[StageSpec], extra: Iterable[str] = ()) -> frozenset[str]:
    """Built-in channels, those the configured stage classes declare, and the config's own list."""
    names = set(BUILTIN_CHANNELS) | set(extra)
    for spec in specs:
        declared = getattr(spec.cls, "channels", ())
        if isinstance(declared, str):
            declared = (declared,)
        names.update(c for c in declared if isinstance(c, str))
    return frozenset(names)


def _lists(node: Any, path: Path_) -> Iterable[tuple[Path_, list[Any]]]:
    """Every `channels:` list under a stage's raw data, with its key path."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            if k == "channels" and isinstance(v, list):
                yield (*path, k), v
            else:
                yield from _lists(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _lists(v, (*path, i))


def check_channels(chk: _Checker, data: Mapping[str, Any], specs: list[StageSpec], extra: list[str]) -> None:
    """Record an error, with a did-you-mean, for each unknown name in any stage's `channels:` list."""
    known = known_channels(specs, extra)
    roots: list[tuple[Path_, Any]] = [(("source",), data.get("source")), (("controller",), data.get("controller"))]
    for key in ("stages", "sinks"):
        items = data.get(key)
        if isinstance(items, list):
            roots.extend(((key, i), item) for i, item in enumerate(items))
    for root, node in roots:
        for path, names in _lists(node, root):
            for i, name in enumerate(names):
                if isinstance(name, str) and name not in known:
                    chk.add((*path, i), unknown_message(name, known))


def unknown_channel(name: str, known: Iterable[str]) -> str:
    """`unknown channel 'x' (did you mean 'y'?)`, or the known names when none is close."""
    choices = sorted(known)
    shown = [c for c in choices if not c.startswith(LIFECYCLE_PREFIX)]
    return f"unknown channel {name!r}" + suggest(name.replace("-", "_"), choices, shown=shown)


def unknown_message(name: str, known: Iterable[str]) -> str:
    return (f"{unknown_channel(name, known)}; a plugin that emits it declares it "
            "(class attribute `channels`, or a top-level `channels:` list)")
