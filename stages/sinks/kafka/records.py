"""What the `kafka` sink holds while the broker has not acknowledged it: records and their writers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

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


#: one record on the wire: key, value, headers, and the records it carries (acknowledged together)
Unit = tuple[bytes | None, bytes, list[tuple[str, bytes]], Sequence[Record]]


def pack(records: list[Record], limit: int) -> Iterator[Unit]:
    """One partition's records as JSON Lines values of at most `limit` bytes (a longer event goes alone).

    Why: a consumer pays per Kafka record (faust: a stream step per record), so
    one record per partition and round costs it once instead of once per event.
    """
    group: list[Record] = []
    size = 0
    for r in records:
        n = len(r.value) + 1
        if group and size + n > limit:
            yield None, b"\n".join([g.value for g in group]), [], group
            group, size = [], 0
        group.append(r)
        size += n
    if group:
        yield None, b"\n".join([g.value for g in group]), [], group


def headers_for(ev: Event) -> list[tuple[str, bytes]]:
    """`channel`, `capture_session_id`, `rtstream_name` headers (those the event has)."""
    out = [("channel", canonical(channel(ev)).encode())]
    for name in HEADER_FIELDS:
        v = ev.get(name)
        if isinstance(v, str) and v:
            out.append((name, v.encode()))
    return out
