"""Comparing what the emulator produced with what a run wrote, by (rtstream, channel, start, text)."""

from __future__ import annotations

from typing import Any

from pipeline.emulator import Emulator

Key = tuple[Any, Any, Any, Any]
TRACKED = ("transcript", "visual_index", "audio_index")


def tracked(event: dict[str, Any]) -> bool:
    """A transcript, visual or audio index event (what VideoDB keeps and a backfill can fetch)."""
    return event.get("channel") in TRACKED


def key(event: dict[str, Any]) -> Key:
    data = event.get("data") or {}
    return (event.get("rtstream_id"), event.get("channel"), data.get("start"), data.get("text"))


def produced(emu: Emulator) -> list[dict[str, Any]]:
    """Every event the emulator produced, sent live or not, once: while a re-bind runs, the replaced index and
    its successor both produce an event, each for its own connection (the one for the dead connection is lost,
    as with VideoDB), and the pipeline keeps one (deduplicated by rtstream, channel, start and text)."""
    seen: set[Any] = set()
    out = []
    for r in emu.emitted:
        ev = r["event"]
        k = key(ev) if tracked(ev) else id(ev)
        if k not in seen:
            seen.add(k)
            out.append(ev)
    return out
