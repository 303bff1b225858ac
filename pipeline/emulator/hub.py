"""WebSocket side of the emulator: connection ids, per-connection outboxes, faults.

Events are queued per connection id and only removed once sent, so a dropped
socket loses nothing: when the client reconnects and re-binds a pipeline from
its old (closed) id to the new one, the old id's queue and routes follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from pipeline.emulator.state import new_id

log = logging.getLogger("pipeline.emulator")


@dataclass
class _Live:
    """An open socket and its sender's wake-up signal."""

    ws: web.WebSocketResponse
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0  # events sent on this connection (not counting garbage frames)


class Hub:
    """Connection registry and delivery: `send(conn_id, event)` never blocks."""

    def __init__(self, *, drop_after: int | None = None, garbage_every: int | None = None) -> None:
        self.drop_after = drop_after
        self.garbage_every = garbage_every
        self.outbox: dict[str, deque[dict[str, Any]]] = {}
        self.live: dict[str, _Live] = {}
        self.known: set[str] = set()
        self.successor: dict[str, str] = {}
        self.delivered = 0
        self.garbage_sent = 0
        self.drops = 0

    def resolve(self, conn: str) -> str:
        """Follow re-binds: the connection id that now stands for `conn`."""
        seen = 0
        while conn in self.successor and seen < 1000:
            conn = self.successor[conn]
            seen += 1
        return conn

    def send(self, conn: str, events: list[dict[str, Any]]) -> None:
        """Queue `events` for `conn` (or its successor) and wake its sender."""
        cid = self.resolve(conn)
        self.outbox.setdefault(cid, deque()).extend(events)
        live = self.live.get(cid)
        if live is not None:
            live.wake.set()

    def rebind(self, old: str | None, new: str) -> None:
        """A pipeline moved from `old` to `new`: if `old` is closed, `new` inherits it."""
        if not old:
            return
        old = self.resolve(old)
        if old == new or old in self.live or old not in self.known or new not in self.known:
            return
        self.successor[old] = new
        pending = self.outbox.pop(old, deque())
        if pending:
            pending.extend(self.outbox.get(new, ()))
            self.outbox[new] = pending
            live = self.live.get(new)
            if live is not None:
                live.wake.set()
        log.info("emulator: connection %s re-bound to %s (%d queued events follow)", old, new, len(pending))

    def pending(self) -> int:
        return sum(len(q) for q in self.outbox.values())

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """GET /ws: send `{"connection_id": ...}`, then this id's events until closed."""
        ws = web.WebSocketResponse(compress=False)  # per-frame deflate would cost more than the rest
        await ws.prepare(request)
        cid = new_id("ws")
        self.known.add(cid)
        live = _Live(ws)
        await ws.send_frame(orjson.dumps({"connection_id": cid}), WSMsgType.TEXT)
        self.live[cid] = live
        sender = asyncio.create_task(self._sender(cid, live))
        try:
            async for msg in ws:  # drain client frames until it (or the sender) closes
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.live.pop(cid, None)
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
                try:
                    await ws.send_frame(orjson.dumps(q[0]), WSMsgType.TEXT)
                except (ConnectionError, RuntimeError):
                    return  # the event stays queued
                q.popleft()
                live.sent += 1
                self.delivered += 1
                if self.garbage_every and live.sent % self.garbage_every == 0:
                    self.garbage_sent += 1
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_str(f"<<emulator garbage frame {self.garbage_sent}: not JSON>>")
                if self.drop_after and live.sent >= self.drop_after:
                    self.drops += 1
                    self.live.pop(cid, None)
                    await ws.close(code=1012, message=b"emulator: drop-after")  # abnormal: clients reconnect
                    return
                q = self.outbox.get(cid)  # a re-bind may have replaced the deque

    async def close_all(self) -> None:
        for live in list(self.live.values()):
            with contextlib.suppress(Exception):
                await live.ws.close(code=1001, message=b"emulator stopping")
