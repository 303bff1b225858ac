"""VideoDB's `Retry-After` reaches our retry logic; the SDK never sleeps it in a worker thread.

The SDK's urllib3 `Retry` honours a `Retry-After` on a GET answered 429 or 503 by sleeping it, uncapped, inside
the worker thread: `Retry-After: 86400` held one of the few SDK threads for a day, a handful of such answers left
every SDK call (binds, backfills, stops, creates) failing for want of a thread, and the call itself failed only
at its deadline, as "took longer than 60 s", without the `retry_after` our own (capped) retries wait. Real SDK,
the emulator's fault injection.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline import sdk_threads, videodb_sdk
from pipeline.emulator import Emulator
from pipeline.videodb_sdk import VideoDBCallError, VideoDBSettings, call, connect
from stages.controller.ai_pipelines import MAX_RETRY_WAIT, retry_wait
from tests.test_controller_hostile import emu as emu  # the shared fixture: an emulator, no scenario


@pytest.mark.parametrize("status", [429, 503])
async def test_a_long_retry_after_fails_the_call_at_once_and_frees_its_thread(
        emu: Emulator, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    """Two GETs answered `status` with `Retry-After: 3600` on a two-thread pool: before, both threads slept an
    hour, both calls failed at their deadline with no retry_after, and the next call found no thread."""
    monkeypatch.setattr(sdk_threads, "_pool", sdk_threads.DaemonPool(2, name="test-sdk-ra"))
    monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 1.0)
    limited = emu.fault("GET", "/capture/session/cap-1", status=status, headers={"Retry-After": "3600"})
    conn = connect(VideoDBSettings("k-0123456789", emu.base_url, "default"), "t")
    began = time.monotonic()
    async with asyncio.timeout(5):
        failed = await asyncio.gather(*(call("t", "get_capture_session", conn.get_capture_session, "cap-1")
                                        for _ in range(2)), return_exceptions=True)
        assert time.monotonic() - began < 0.9, failed
        for err in failed:
            assert isinstance(err, VideoDBCallError), err
            assert (err.status, err.retry_after, err.overdue, err.fatal) == (status, 3600.0, False, False), err
            assert str(err).startswith(f"t: get_capture_session failed: HTTP {status}: "), err
            assert retry_wait(0.2, err.retry_after) == MAX_RETRY_WAIT  # what our own retry then waits
        assert limited.hits == 2  # one request each: the SDK did not ask again
        assert await call("t", "list_capture_sessions", conn.list_capture_sessions) == []  # a thread is free


async def test_a_5xx_without_retry_after_is_still_retried_by_the_sdk(emu: Emulator) -> None:
    """Guards what is kept: a GET answered 502/503/504 without `Retry-After` is asked again once by the SDK
    (after its short backoff), so one such answer does not fail the call."""
    busy = emu.fault("GET", "/capture/session", status=503, times=1)
    conn = connect(VideoDBSettings("k-0123456789", emu.base_url, "default"), "t")
    assert await call("t", "list_capture_sessions", conn.list_capture_sessions) == []
    assert busy.hits == 1 and len([c for c in emu.calls if c["path"].endswith("/capture/session")]) == 2
