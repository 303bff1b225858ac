"""Requests to the operator endpoint take their turn: the pipeline's own work comes first.

Answering a request costs the pipeline's event loop 66-77 µs on a 2-core machine (parsing it, routing,
answering: /healthz, /api/status and a 404 alike), so eight clients asking back to back took 80% of it,
and /healthz, /metrics and 404s are open to anyone who reaches the port. Each request now waits its turn
(RATE a second, all clients together, after a burst of BURST): a client asking faster is slowed, not
refused, and since a connection has one request under way at a time and connections are bounded, so are
the requests waiting; one whose client leaves gives its turn back, so the turns owed stay bounded too.
Prometheus, probes, status pages and `pipeline top` ask a few times a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

RATE = 500.0  # requests a second, all clients together (about 4% of the event loop)
BURST = 100.0  # requests answered at once before the rate applies

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Pacer:
    """A token bucket whose tokens are taken in advance: each request sleeps once, for its place in line."""

    def __init__(self, rate: float = RATE, burst: float = BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self._last = time.monotonic()

    def wait(self) -> float:
        """Take one turn; the seconds until it comes (0: now)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate) - 1
        self._last = now
        return max(0.0, -self.tokens / self.rate)

    async def turn(self) -> None:
        """Wait for one turn."""
        delay = self.wait()
        if delay:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:  # its client left: the turn goes back, or leaving clients built a debt
                self.tokens += 1  # (a connection opened, asked and closed in a loop) that every later one paid
                raise

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        await self.turn()
        return await handler(request)
