"""WebSocket side of the emulator: connection ids, per-connection outboxes, faults.

Like VideoDB, an event produced for a connection that is gone is not delivered
later: when a socket closes, whatever was still queued for it is discarded (its
record keeps `live: false`), and events routed to it until a pipeline re-binds
to a new connection id are not sent either; a session's lifecycle events always go
to the connection it was created with. Everything stays retrievable over
REST (see `routes.py`). `queue_on_drop=True` restores the old, lossless test
behaviour: events wait for the re-bind and the new connection inherits them.

Outbox entries are the player's records `{"connection_id", "event", "live"}`;
the sender sets `live` once the frame went out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from pipeline.emulator.state import new_id

log = logging.getLogger("pipeline.emulator")

Record = dict[str, Any]  # {"connection_id", "event", "live"}


@dataclass
class _Live:
    """An open socket and its sender's wake-up signal."""

    ws: web.WebSocketResponse
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0  # events sent on this connection (not counting garbage frames)


class Hub:
    """Connection registry and delivery: `send(conn_id, records)` never blocks."""

    def __init__(self, *, drop_after: int | None = None, garbage_every: int | None = None,
                 queue_on_drop: bool = False) -> None:
        self.drop_after = drop_after
        self.garbage_every = garbage_every
        self.queue_on_drop = queue_on_drop
        self.outbox: dict[str, deque[Record]] = {}
        self.live: dict[str, _Live] = {}
        self.known: set[str] = set()
        self.successor: dict[str, str] = {}
        self.delivered = 0
        self.garbage_sent = 0
        self.drops = 0  # sockets closed by drop_after or drop()
        self.drop_times: list[float] = []  # time.monotonic() of each of those closes
        self.undelivered = 0  # events produced while their connection was gone (not sent, as VideoDB)

    def resolve(self, conn: str) -> str:
        """Follow re-binds: the connection id that now stands for `conn` (only with queue_on_drop: VideoDB
        sends each pipeline's events to the id it was last given and lifecycle events to the one the session
        was created with; nothing moves a connection's events to another)."""
        seen = 0
        while conn in self.successor and seen < 1000:
            conn = self.successor[conn]
            seen += 1
        return conn

    def send(self, conn: str, records: list[Record]) -> None:
        """Queue `records` for `conn` (or its successor) and wake its sender; gone: dropped."""
        cid = self.resolve(conn)
        live = self.live.get(cid)
        if live is None and not self.queue_on_drop:
            self.undelivered += len(records)
            return
        self.outbox.setdefault(cid, deque()).extend(records)
        if live is not None:
            live.wake.set()

    def rebind(self, old: str | None, new: str) -> None:
        """A pipeline moved from `old` to `new`: if `old` is closed, `new` stands for it from now on."""
        if not old:
            return
        old = self.resolve(old)
        if not self.queue_on_drop or old == new or old in self.live or old not in self.known \
                or new not in self.known:
            return
        self.successor[old] = new
        pending = self.outbox.pop(old, deque())  # empty unless queue_on_drop
        if pending:
            pending.extend(self.outbox.get(new, ()))
            self.outbox[new] = pending
            live = self.live.get(new)
            if live is not None:
                live.wake.set()
        log.info("emulator: connection %s re-bound to %s (%d queued events follow)", old, new, len(pending))

    def pending(self) -> int:
        return sum(len(q) for q in self.outbox.values())

    def _gone(self, cid: str) -> None:
        """`cid` closed: forget its socket; unless queue_on_drop, what it did not get is lost."""
        self.live.pop(cid, None)
        if not self.queue_on_drop:
            self.undelivered += len(self.outbox.pop(cid, ()))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """GET /ws: send `{"connection_id": ...}`, then this id's events until closed."""
        ws = web.WebSocketResponse(compress=False)  # per-frame deflate would cost more than the rest
        await ws.prepare(request)
        cid = new_id("ws")
        self.known.add(cid)
        live = _Live(ws)
        self.live[cid] = live
        sender: asyncio.Task[None] | None = None
        try:
            await ws.send_frame(orjson.dumps({"connection_id": cid}), WSMsgType.TEXT)
            sender = asyncio.create_task(self._sender(cid, live))
            async for msg in ws:  # drain client frames until it (or the sender) closes
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._gone(cid)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        return ws

    async def _sender(self, cid: str, live: _Live) -> None:
        ws = live.ws
        live.wake.set()
        while not ws.closed:
            await live.wake.wait()
            live.wake.clear()
            q = self.outbox.get(cid)
            while q and not ws.closed:
                rec = q[0]
                try:
                    await ws.send_frame(orjson.dumps(rec["event"]), WSMsgType.TEXT)
                except (ConnectionError, RuntimeError):
                    return  # the event stays queued (or is discarded with the connection)
                q.popleft()
                rec["live"] = True
                live.sent += 1
                self.delivered += 1
                if self.garbage_every and live.sent % self.garbage_every == 0:
                    self.garbage_sent += 1
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_str(f"<<emulator garbage frame {self.garbage_sent}: not JSON>>")
                if self.drop_after and live.sent >= self.drop_after:
                    self.drops += 1
                    self.drop_times.append(time.monotonic())
                    self._gone(cid)
                    await ws.close(code=1012, message=b"emulator: drop-after")  # abnormal: clients reconnect
                    return
                q = self.outbox.get(cid)  # a re-bind may have replaced the deque

    async def drop(self, cid: str | None = None) -> list[str]:
        """Close `cid`'s socket (None: every open one) as `drop_after` does: close code 1012, so clients
        reconnect; what was still queued for it is discarded unless queue_on_drop. Returns the ids closed."""
        gone = [(c, self.live[c]) for c in ([cid] if cid is not None else list(self.live)) if c in self.live]
        for c, _live in gone:
            self.drops += 1
            self.drop_times.append(time.monotonic())
            self._gone(c)
        # concurrently: each close waits for its client's answer
        await asyncio.gather(*(live.ws.close(code=1012, message=b"emulator: dropped on request")
                               for _c, live in gone), return_exceptions=True)
        return [c for c, _live in gone]

    async def close_all(self) -> None:
        for live in list(self.live.values()):
            with contextlib.suppress(Exception):
                await live.ws.close(code=1001, message=b"emulator stopping")
