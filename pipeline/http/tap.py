"""Live taps: copies of the events at one point of the pipeline, for clients that may be slow.

The runtime holds `tap = None` while nobody is attached, so the cost then is one
attribute check per batch. With clients, each gets its own bounded buffer of
serialized events (one JSON array per batch: one serializer call, one message);
when it is full, events are counted as dropped for that client (who is told) and
the pipeline never waits. The tap's CPU is bounded too (`TapBudget`): a client
that wants every event of a pipeline running flat out (a replay) would
otherwise cost it a second serialization of everything, plus sending it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from typing import Any

import orjson

from pipeline.events import ALIASES, LIFECYCLE, Batch, channel_set, in_channels

DEFAULT_BUFFER = 2000  # events a client may fall behind before its tap drops
#: bytes of serialized events a client may fall behind (events come off the wire, up to a MiB each: 2000 of
#: them, for each of 16 clients, would be gigabytes); one batch is always taken into an empty buffer
BUFFER_BYTES = 8 << 20
#: Share of the pipeline's time the tap may spend (CPU: serializing events and writing them to the clients,
#: all clients together). Beyond it, batches are dropped for the clients, and counted.
TAP_SHARE = 0.05
TAP_BURST = 0.05  # seconds of it that may be saved up while the pipeline is quiet


class TapBudget:
    """CPU time the tap (or /metrics) may spend: refills at `share` of the time that passes, up to `burst`.

    A live meeting (tens of events a second) never reaches it; a replay at full speed with a client taking
    every event does, and the client is told what it missed instead of the pipeline slowing down.
    """

    __slots__ = ("_last", "burst", "left", "share")

    def __init__(self, share: float = TAP_SHARE, burst: float = TAP_BURST) -> None:
        self.share, self.burst = share, burst
        self.left = burst
        self._last = time.perf_counter()

    def available(self) -> bool:
        now = time.perf_counter()
        self.left = min(self.burst, self.left + (now - self._last) * self.share)
        self._last = now
        return self.left > 0

    def charge(self, seconds: float) -> None:
        self.left -= seconds


@dataclass(frozen=True)
class Point:
    index: int  # 0 source, 1.. processors in order, -1-i sink i
    label: str
    kind: str  # source | processor | sink
    type_name: str


class TapError(ValueError):
    """A tap request that names no point, or has a bad parameter (answered with 400)."""


class TapClient:
    """One attached client: what it wants and what it has not taken yet."""

    def __init__(self, point: Point, channels: list[str] | None = None, sample: float = 1.0,
                 limit: int | None = None, buffer: int = DEFAULT_BUFFER) -> None:
        self.point = point
        self.channels = channel_set(channels) if channels else None
        self.sample = sample
        self.limit = limit
        self.buffer: deque[bytes] = deque()  # JSON arrays of events, one per offered batch
        self.pending = 0  # events in `buffer`
        self.pending_bytes = 0  # bytes in `buffer`
        self.max = buffer
        self.dropped = 0  # events this client missed because its buffer was full
        self.offered = 0  # events accepted into the buffer (counts towards `limit`)
        self._credit = 0.0
        self.wake = asyncio.Event()
        self.budget: TapBudget | None = None  # the hub's, once attached

    @property
    def done(self) -> bool:
        return self.limit is not None and self.offered >= self.limit

    def _select(self, batch: Batch, groups: Groups | None) -> Batch:
        chans = self.channels
        if chans is not None:
            if groups is None:
                batch = [e for e in batch if in_channels(e, chans)]
            else:  # the hub sorted the batch by channel once for all clients: this costs what it selects
                places = [g for key, g in groups.items() if _wants(key, chans)]
                at = places[0] if len(places) == 1 else sorted(chain.from_iterable(places))
                batch = [batch[i] for i in at]
        if self.sample < 1.0:  # each event adds `sample` to a credit; one that brings it to 1 is taken (and 1 taken
            # off): the places of those are counted out, not found by looking at every event (16 clients each
            # looking cost a replay 16% of its time, outside the tap's budget)
            credit, rate, n = self._credit, self.sample, len(batch)
            total = credit + n * rate
            picks = int(total + 1e-9)  # (0.1 added ten times is 0.9999...)
            batch = [batch[min(n - 1, max(0, math.ceil((j - 1e-9 - credit) / rate) - 1))] for j in range(1, picks + 1)]
            self._credit = max(0.0, total - picks)
        return batch

    def offer(self, batch: Batch, groups: Groups | None = None) -> None:
        """Copy the wanted events of a batch (serialized now: later stages may change the dicts); `groups`:
        the batch's places by channel, from `by_channel`."""
        if self.done:
            return
        wanted = self._select(batch, groups)
        if self.limit is not None:
            wanted = wanted[: self.limit - self.offered]
        room = self.max - self.pending
        if len(wanted) > room:
            self.dropped += len(wanted) - max(room, 0)
            wanted = wanted[: max(room, 0)]
        if not wanted:
            return
        budget = self.budget
        if budget is not None and not budget.available():  # the tap had its share of the pipeline's time
            self.dropped += len(wanted)
            return
        t0 = time.thread_time()  # CPU time: a busy machine that preempts us mid-call does not spend the budget
        try:
            data = orjson.dumps(wanted, default=str)
        except TypeError:  # an event orjson cannot encode (half an emoji, too deep): each on its own
            parts = [(e, _encoded(e)) for e in wanted]
            wanted = [e for e, raw in parts if raw is not None]
            self.dropped += len(parts) - len(wanted)  # (a cycle, a depth Python cannot walk either)
            data = b"[" + b",".join(raw for _, raw in parts if raw is not None) + b"]"
        if budget is not None:
            budget.charge(time.thread_time() - t0)
        if self.pending and self.pending_bytes + len(data) > BUFFER_BYTES:
            self.dropped += len(wanted)
            return
        self.buffer.append(data)
        self.pending += len(wanted)
        self.pending_bytes += len(data)
        self.offered += len(wanted)
        self.wake.set()

    def take(self) -> list[bytes]:
        """Everything buffered (JSON arrays), emptying the buffer."""
        out = list(self.buffer)
        self.buffer.clear()
        self.pending = self.pending_bytes = 0
        return out


def _encoded(event: object) -> bytes | None:
    """`event` as JSON; a lone UTF-16 surrogate (half an emoji, which sinks dead-letter) shown as `?`, and
    nesting deeper than orjson's limit written by the json module. None when neither can write it."""
    try:
        return orjson.dumps(event, default=str)
    except TypeError:
        pass
    try:
        return json.dumps(event, default=str, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")
    except (TypeError, ValueError, RecursionError):
        return None


class TapHub:
    """The tap points of one pipeline and the clients attached to them."""

    def __init__(self, points: Any, arm: Any) -> None:
        self._points = points  # () -> the current points (a config reload may change the processors)
        self._arm = arm  # arm(hub or None): installs this hub where the runtime checks for it
        self.clients: dict[int, list[TapClient]] = {}
        self._dropped_gone = 0
        self.budget = TapBudget()  # shared by all clients

    @property
    def points(self) -> list[Point]:
        return list(self._points())

    @property
    def client_count(self) -> int:
        return sum(len(c) for c in self.clients.values())

    @property
    def dropped(self) -> int:
        return self._dropped_gone + sum(c.dropped for cs in self.clients.values() for c in cs)

    def resolve(self, at: str) -> Point:
        """`source`, a processor index (`2`) or type (`rules`), a label (`stages[2]:rules`), a sink type or label."""
        at = at.strip()
        if at.isdigit():
            want = f"stages[{at}]:"
            found = [p for p in self.points if p.label.startswith(want)]
        else:
            found = [p for p in self.points if at in (p.label, p.label.split(":", 1)[0])]
            if not found:
                found = [p for p in self.points if p.type_name == at or p.kind == at == "source"]
        if len(found) == 1:
            return found[0]
        names = ", ".join(p.label for p in self.points)
        if not found:
            raise TapError(f"no tap point {at!r}; choose one of: source, {names}")
        raise TapError(f"{at!r} names {len(found)} points ({', '.join(p.label for p in found)}); use a label")

    def attach(self, client: TapClient) -> None:
        client.budget = self.budget
        self.clients.setdefault(client.point.index, []).append(client)
        self._arm(self)

    def detach(self, client: TapClient) -> None:
        cs = self.clients.get(client.point.index, [])
        if client in cs:
            cs.remove(client)
            self._dropped_gone += client.dropped
            if not cs:
                del self.clients[client.point.index]
        if not self.clients:
            self._arm(None)

    def publish(self, index: int, batch: Batch) -> None:
        """Called by the runtime at tap point `index` while any client is attached. Clients that want some
        channels share one pass over the batch: each looking at every event cost the pipeline's own time
        (16 clients wanting a channel the batch did not hold slowed a replay by 60%, outside the tap's budget)."""
        clients = self.clients.get(index, ())
        groups = by_channel(batch) if sum(c.channels is not None for c in clients) > 1 else None
        for c in clients:
            c.offer(batch, groups)


Groups = dict[object, list[int]]  # a channel (or a lifecycle event's name) -> places in the batch, in order


def by_channel(batch: Batch) -> Groups:
    """The places of a batch's events by their canonical channel; a lifecycle event by ("event", its name)."""
    groups: Groups = {}
    for i, e in enumerate(batch):
        ch = e.get("channel")
        if ch is None:
            if "event" not in e:
                continue
            ev = e["event"]
            key: object = ("event", ev if type(ev) is str else None)
        elif isinstance(ch, str):
            key = ALIASES.get(ch, ch)
        else:
            continue
        g = groups.get(key)
        if g is None:
            groups[key] = [i]
        else:
            g.append(i)
    return groups


def _wants(key: object, channels: frozenset[str]) -> bool:
    """`in_channels` for a key of `by_channel`."""
    if type(key) is tuple:
        return LIFECYCLE in channels or (key[1] is not None and key[1] in channels)
    return key in channels


def points_of(built: Any) -> list[Point]:
    """Tap points as the runtime numbers them: 0 the source, 1.. the processors, -1-i sink i."""
    out = []
    if built.source is not None:
        out.append(Point(0, built.source.context.stage, "source", built.source.name))
    for n, p in enumerate(built.chain.processors, 1):
        out.append(Point(n, p.context.stage, "processor", p.name))
    for i, slot in enumerate(built.sinks):
        out.append(Point(-1 - i, slot.stats.name, "sink", slot.sink.name))
    return out
