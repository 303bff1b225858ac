"""Requests a peer gets wrong cost one debug line on our HTTP servers, never an ERROR with a traceback.

Real servers (the session API against the emulator, the operator endpoint of a built pipeline),
real sockets writing what an HTTP client library would refuse to send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.operator_harness import config, replay_file, served
from tests.test_session_api import TOKEN, running
from tests.test_session_api import emulator as emulator  # the shared fixture

#: each is refused by aiohttp's parser, before any handler or token check: a plain-text 400
MALFORMED = (b"GET /v1/sessions?after=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 9000 + b"\r\n\r\n",
             b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")


async def exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read()  # the server closes after its 400
    finally:
        writer.close()


async def server_records(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    """The first `n` records aiohttp's server logger wrote (waited for: a hang-up is seen a moment later)."""
    async with asyncio.timeout(10):
        while len(found := [r for r in caplog.records if r.name == "aiohttp.server"]) < n:
            await asyncio.sleep(0.01)
    return found


def assert_one_line_each(records: list[logging.LogRecord]) -> None:
    for r in records:  # before: ERROR 'Error handling request' with the parser's traceback and the peer's bytes
        assert r.levelno == logging.DEBUG and r.exc_info is None, (r.levelname, r.getMessage())
        assert "\n" not in r.getMessage() and len(r.getMessage()) < 400, r.getMessage()


async def test_malformed_requests_and_hang_ups_on_the_session_api_are_one_debug_line(
        emulator: Emulator, make_context: Callable[..., Context], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    async with running(make_context, emulator, ingest=False) as live:
        for data in MALFORMED:  # no token needed: anyone who reaches the port could flood the log
            assert (await exchange(live.url, data)).startswith(b"HTTP/1.0 400"), data[:40]
        host, port = live.url.removeprefix("http://").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n{\"end_user")
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is reading the body when the client hangs up
        writer.close()
        records = await server_records(caplog, len(MALFORMED) + 1)
    assert_one_line_each(records)
    assert "ConnectionResetError" in records[-1].getMessage()


async def test_malformed_requests_on_the_operator_endpoint_are_one_debug_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    async with served(config(tmp_path, replay_file(tmp_path / "in.jsonl", 1))) as (_, base):
        for data in MALFORMED:
            assert (await exchange(base, data)).startswith(b"HTTP/1.0 400"), data[:40]
        records = await server_records(caplog, len(MALFORMED))
    assert_one_line_each(records)


async def test_connections_to_the_operator_endpoint_are_bounded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics is open to anyone who reaches the port: connections over the bound get a 503 at once, and the
    endpoint answers again once the others are closed (before: every connection was taken, each a file
    descriptor of the pipeline, so a peer holding thousands starved its sinks and WebSocket of descriptors)."""
    from pipeline.http import server

    monkeypatch.setattr(server, "MAX_CONNECTIONS", 5, raising=False)
    async with served(config(tmp_path, replay_file(tmp_path / "in.jsonl", 1))) as (_, base):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        conns = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            conns.append((reader, writer))
        try:
            async with asyncio.timeout(5):  # the busy ones are answered at once, not at the 15 s idle limit
                busy = [await reader.read() for reader, _ in conns[5:]]
        finally:
            for _, writer in conns:
                writer.close()
        assert all(b.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in b for b in busy), busy
        async with aiohttp.ClientSession() as http:
            async def metrics() -> int:
                async with http.get(base + "/metrics") as r:
                    return r.status
            async with asyncio.timeout(10):
                while await metrics() != 200:  # the closed ones leave the count as the server sees them go
                    await asyncio.sleep(0.05)
