"""What the `kafka` sink holds while the broker has not acknowledged it: records and their writers."""

from __future__ import annotations

import asyncio

from pipeline.events import Event, canonical, channel

HEADER_FIELDS = ("capture_session_id", "rtstream_name")


class Pending:
    """One `write()` call waiting for its records."""

    __slots__ = ("done", "left")

    def __init__(self, left: int, done: asyncio.Future[None]) -> None:
        self.left = left
        self.done = done


class Record:
    __slots__ = ("event", "headers", "key", "owner", "topic", "value")

    def __init__(self, topic: str, key: bytes | None, value: bytes,
                 headers: list[tuple[str, bytes]], event: Event, owner: Pending) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.event = event
        self.owner = owner



def headers_for(ev: Event) -> list[tuple[str, bytes]]:
    """`channel`, `capture_session_id`, `rtstream_name` headers (those the event has)."""
    out = [("channel", canonical(channel(ev)).encode())]
    for name in HEADER_FIELDS:
        v = ev.get(name)
        if isinstance(v, str) and v:
            out.append((name, v.encode()))
    return out
