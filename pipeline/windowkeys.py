"""Config check: under `engine: faust`, a `window` stage's key must name the capture session or rtstream.

Why: the ingest partitions events by capture session, and each worker keeps the windows of its own
partitions. A window keyed by something shared across sessions (`rtstream_name`, `channel`) had its events
in several partitions, so every worker owning one emitted its own partial `metrics` event for the same key
and window (tested: 8 sessions, 2 workers, `key: [rtstream_name]`: 24 metrics of half the counts each,
where the local runtime emits 12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import _Checker

#: fields whose value is one capture session: all of its events are in one ingest partition
SESSION_FIELDS = ("capture_session_id", "rtstream_id")


def check_window_keys(chk: _Checker, data: Mapping[str, Any], engine: str) -> None:
    """Record an error for each enabled `window` stage whose key holds none of SESSION_FIELDS (faust only)."""
    stages = data.get("stages")
    if engine != "faust" or not isinstance(stages, list):
        return
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or stage.get("type") != "window":
            continue
        enabled = stage.get("enabled", True)
        if isinstance(enabled, str):  # `enabled: "${WINDOW_ON:-false}"`: what YAML reads the text as
            enabled = chk.typed.get(("stages", i, "enabled"), enabled)
        if enabled is False:
            continue
        key = stage.get("key", ["capture_session_id"])
        if not isinstance(key, list) or any(field in key for field in SESSION_FIELDS):
            continue  # (a key that is no list is the option's own error)
        example = f"[capture_session_id, {key[0]}]" if key else "[capture_session_id]"
        chk.add(("stages", i, "key"), f"{key!r} groups events of several capture sessions, which engine: faust "
                "spreads over partitions and workers (each would emit its own partial metrics for a window); "
                f"expected a key with capture_session_id or rtstream_id, e.g. {example}, or engine: local")
