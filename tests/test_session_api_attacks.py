"""The session API under hostile clients, races and damaged state: real SDK, emulator, HTTP and files.

Each test reproduces a defect found by attacking the API; the flows it should not break are in
test_session_api.py and test_session_api_contract.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_session_api import Live, running, session_calls
from tests.test_session_api import emulator as emulator  # the shared fixture


async def raw_request(live: Live, head: bytes, body: bytes = b"") -> bytes:
    """One HTTP/1.1 exchange written byte for byte (what aiohttp's client would refuse to send)."""
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def status_of(live: Live, sid: str, want: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll GET /v1/sessions/{sid} until its status is `want`; the last view otherwise (the assert shows it)."""
    deadline = time.monotonic() + timeout
    while True:
        status, view = await live.call("GET", f"/v1/sessions/{sid}")
        if (status == 200 and view["status"] == want) or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.05)


async def test_concurrent_creates_never_pass_max_sessions(emulator: Emulator,
                                                          make_context: Callable[..., Context]) -> None:
    """Six POSTs at once with max_sessions 2: two sessions, four 429s (before: all six created, since each
    request counted the live sessions before any of the others had returned)."""
    async with running(make_context, emulator, api={"max_sessions": 2}) as live:
        answers = await asyncio.gather(*(live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"})
                                         for i in range(6)))
        assert sorted(status for status, _ in answers) == [201, 201, 429, 429, 429, 429]
        assert len(session_calls(emulator)) == 2
        assert (await live.call("GET", "/v1/sessions"))[1]["count"] == 2


async def test_hostile_headers_and_bodies_get_a_json_4xx(emulator: Emulator,
                                                         make_context: Callable[..., Context]) -> None:
    """Bytes that are not UTF-8 in Authorization, and JSON nested too deeply to store, are refused in one line
    (before: 500 'Server got itself in trouble' and a traceback in the log, or a session whose listing failed)."""
    async with running(make_context, emulator) as live:
        answer = await raw_request(live, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe")
        assert answer.startswith(b"HTTP/1.1 401") and b'"status":401' in answer, answer

        for depth in (300, 251):  # 300: orjson cannot even hash it; 251: storable, but a listing nests deeper
            body = b'{"end_user_id": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
            status, err = await live.call("POST", "/v1/sessions", data=body)
            assert status == 400 and "nested" in err["error"], err
        status, err = await live.call("POST", "/v1/sessions", data=b'{"end_user_id": "x", "on_active": '
                                      + b"[" * 300 + b"]" * 300 + b"}")
        assert status == 400, err
        assert session_calls(emulator) == []
        assert (await live.call("GET", "/v1/sessions"))[0] == 200
