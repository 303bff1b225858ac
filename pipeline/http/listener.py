"""Listening for our HTTP servers (the session API, the operator endpoint) with a bound on open connections.

aiohttp accepts every connection and keeps one whose request never completes
for its keep-alive time, so clients that open connections and trickle their
headers could take every file descriptor the pipeline has (its sinks and its
WebSocket need them too). Here a connection beyond the bound is answered 503
and closed at once; the headers' time limit is aiohttp's keep-alive timeout,
which also runs from the moment a connection opens.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

_BUSY: Final = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n'
                b'Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s')
_BUSY_BODY: Final = b'{"error": "too many open connections; retry shortly", "status": 503}'


class _Busy(asyncio.Protocol):
    """A connection over the bound: one 503 answer, then closed (nothing is read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
        transport.close()


async def listen(runner: web.AppRunner, host: str, port: int, max_connections: int) -> asyncio.Server:
    """Serve `runner` (set up) on host:port, at most `max_connections` connections at a time."""
    server = runner.server
    assert server is not None, "runner.setup() first"

    def protocol() -> Any:
        return _Busy() if len(server.connections) >= max_connections else server()

    return await asyncio.get_running_loop().create_server(protocol, host, port, reuse_address=True)
