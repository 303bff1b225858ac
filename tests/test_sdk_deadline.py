"""Every SDK call has an overall deadline: a VideoDB that trickles its answer cannot hold a caller (or the
worker pool) for ever.

The SDK's 30 s timeout is per read, so an answer sent a byte at a time kept a call, and one of the few worker
threads, busy for as long as the server kept sending; a silent check of 50 sessions against such a VideoDB took
minutes. Real SDK, a real HTTP server that trickles its answer, the emulator for calls that go through.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from pipeline import sdk_threads, videodb_sdk
from pipeline.emulator import Emulator
from pipeline.videodb_sdk import VideoDBCallError, VideoDBSettings, call, connect
from tests.test_controller_hostile import emu as emu  # the shared fixture: an emulator, no scenario

_BODY = b'{"success": true, "data": {"id": "cap-slow", "status": "active"}}'


@dataclass
class Trickle:
    """An HTTP server that answers every request one byte every 50 ms until `release` is set."""

    url: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    answered: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(_BODY)
        await resp.prepare(request)
        for i in range(len(_BODY)):
            if self.release.is_set():
                await resp.write(_BODY[i:])
                break
            await resp.write(_BODY[i:i + 1])
            await asyncio.sleep(0.05)
        await resp.write_eof()
        self.answered += 1
        return resp


@pytest.fixture
async def trickle() -> AsyncIterator[Trickle]:
    t = Trickle()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", t.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    t.url = f"http://127.0.0.1:{port}"
    yield t
    t.release.set()  # the threads still reading finish their calls
    async with asyncio.timeout(10):
        while t.answered < t.requests:
            await asyncio.sleep(0.02)
    await runner.cleanup()


def sdk(url: str) -> object:
    return connect(VideoDBSettings("k-0123456789", url, "default"), "t")


async def test_a_trickled_answer_fails_the_call_at_the_deadline(trickle: Trickle,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 0.3)
    conn = sdk(trickle.url)
    began = time.monotonic()
    async with asyncio.timeout(5):  # the answer takes 3 s+ at a byte per 50 ms; no read waits 30 s
        with pytest.raises(VideoDBCallError) as err:
            await call("t", "get_capture_session", conn.get_capture_session, "cap-slow")  # type: ignore[attr-defined]
    assert time.monotonic() - began < 2
    assert str(err.value) == ("t: get_capture_session failed: took longer than 0.3 s (VideoDB answers too "
                              "slowly; the call is left to finish on its own)")
    assert (err.value.status, err.value.fatal, err.value.call) == (None, False, "get_capture_session")
    assert trickle.requests == 1 and trickle.answered == 0  # the thread is still reading it


async def test_threads_stuck_in_slow_calls_stay_busy_and_new_calls_fail_at_the_deadline(
        trickle: Trickle, emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both threads of a two-thread pool are held by trickled answers: a call to a healthy VideoDB fails at its
    deadline (no thread came free; it is never sent), no third thread starts; once the answers end, calls
    go through again."""
    pool = sdk_threads.DaemonPool(2, name="test-sdk")  # its threads stay (idle) after the test
    monkeypatch.setattr(sdk_threads, "_pool", pool)
    monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 0.3)
    slow, healthy = sdk(trickle.url), sdk(emu.base_url)
    async with asyncio.timeout(5):
        stuck = await asyncio.gather(*(call("t", "get_capture_session", slow.get_capture_session,  # type: ignore[attr-defined]
                                            f"cap-{i}") for i in range(2)), return_exceptions=True)
        assert all("took longer than 0.3 s" in str(e) for e in stuck), stuck
        assert trickle.requests == 2 and trickle.answered == 0
        began = time.monotonic()
        with pytest.raises(VideoDBCallError) as err:
            await call("t", "list_capture_sessions", healthy.list_capture_sessions)  # type: ignore[attr-defined]
        assert 0.25 < time.monotonic() - began < 2
    assert str(err.value) == ("t: list_capture_sessions failed: no SDK worker thread came free within 0.3 s "
                              "(all 2 are busy with calls VideoDB is slow to answer)")
    assert pool._threads == 2 == sum(t.name.startswith("test-sdk-") for t in threading.enumerate())
    trickle.release.set()
    async with asyncio.timeout(5):
        while trickle.answered < 2:
            await asyncio.sleep(0.02)
        assert await call("t", "list_capture_sessions", healthy.list_capture_sessions) == []  # type: ignore[attr-defined]
    listed = [c for c in emu.calls if c["path"].endswith("/capture/session")]
    assert len(listed) == 1  # the call that gave up waiting for a thread never ran
    assert pool._threads == 2


async def test_a_call_queued_behind_slow_ones_gets_its_whole_deadline_once_it_runs(
        emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four calls at once on a two-thread pool, VideoDB answering each in 0.4 s, a 0.6 s deadline: the two that
    wait for a thread start 0.4 s late and still get 0.6 s to run, so all four answer (before: the wait used
    up their deadline, and they failed as "took longer than 0.6 s" 0.2 s after VideoDB got them)."""
    pool = sdk_threads.DaemonPool(2, name="test-sdk")
    monkeypatch.setattr(sdk_threads, "_pool", pool)
    monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 0.6)
    emu.fault("GET", "/capture/session", delay=0.4)  # handled, then answered 0.4 s late
    conn = sdk(emu.base_url)
    began = time.monotonic()
    async with asyncio.timeout(5):
        got = await asyncio.gather(*(call("t", "list_capture_sessions", conn.list_capture_sessions)  # type: ignore[attr-defined]
                                     for _ in range(4)), return_exceptions=True)
    assert got == [[]] * 4, got
    assert time.monotonic() - began > 0.75  # two rounds of 0.4 s: the last two did wait for a thread
    listed = [c for c in emu.calls if c["path"].endswith("/capture/session")]
    assert len(listed) == 4 and listed[-1]["at"] - listed[0]["at"] > 0.35
