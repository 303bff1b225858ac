"""Single-session controller: a bind that could not read the session's rtstreams is tried again.

An `active` event without `rtstreams` makes the controller ask VideoDB for them (`get_capture_session`). When
that failed (a 5xx, a 429, the network), the error was logged and nothing else happened: the AI pipelines stayed
unbound until the next reconnect, which might never come. Real SDK, the emulator's fault injection.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_controller_hostile import emu as emu  # the shared fixture: an emulator, no scenario
from tests.test_controller_hostile import lifecycle, single, transcript_starts, until


def asks(emu: Emulator, sid: str) -> list[float]:
    """When the controller asked for the session."""
    return [c["at"] for c in list(emu.calls) if c["method"] == "GET" and c["path"].endswith(f"/capture/session/{sid}")]


async def active_without_rtstreams(emu: Emulator, make_context: Callable[..., Context], **fault: Any) -> Any:
    """A controller (status_poll_interval 0.2 s) whose session went active, told by an event without rtstreams,
    the session's reads answered as `fault` says."""
    ctl = await single(emu, make_context, exit_on="none", status_poll_interval=0.2)
    sid = ctl.session_id
    emu.registry.sessions[sid].status = "active"  # VideoDB has it active, its rtstreams listed
    fault = emu.fault("GET", f"/capture/session/{sid}", **fault)
    ctl.observe([lifecycle(sid, "starting"), lifecycle(sid, "active")])
    return ctl, fault


async def test_a_failed_read_of_the_rtstreams_is_tried_again_until_the_bind_is_made(
        emu: Emulator, make_context: Callable[..., Context]) -> None:
    ctl, fault = await active_without_rtstreams(emu, make_context, status=500, times=2)
    try:
        # both audio streams' transcripts started, then the bind is done (the emulator sees the second start
        # before the SDK's answer reaches the controller: asserting `bound_to` right then failed now and then)
        await until(lambda: len(transcript_starts(emu)) == 2 and ctl.pipelines.bound_to == "ws-test", timeout=5)
        at = asks(emu, ctl.session_id)
        assert fault.hits == 2 and len(at) == 3
        assert all(b - a >= 0.19 for a, b in itertools.pairwise(at)), at  # one status_poll_interval apart
    finally:
        await ctl.close()


async def test_a_failed_read_of_the_rtstreams_is_counted_in_the_error_stats(
        emu: Emulator, make_context: Callable[..., Context]) -> None:
    """It was logged but not counted (the session API counted the same failure): the stats said no error."""
    ctl, fault = await active_without_rtstreams(emu, make_context, status=500, times=1)
    try:
        await until(lambda: len(transcript_starts(emu)) == 2, timeout=5)
        assert fault.hits == 1 and ctl.context.stats.errors == 1
    finally:
        await ctl.close()


async def test_the_retry_waits_videodb_s_retry_after_and_ends_with_the_session(
        emu: Emulator, make_context: Callable[..., Context]) -> None:
    ctl, fault = await active_without_rtstreams(emu, make_context, status=429, headers={"Retry-After": "1"})
    try:
        await until(lambda: fault.hits >= 2, timeout=5)
        at = asks(emu, ctl.session_id)
        assert at[1] - at[0] >= 0.95, at  # what VideoDB asked, not status_poll_interval
        sid = ctl.session_id
        ctl.observe([lifecycle(sid, "stopping"), lifecycle(sid, "stopped")])
        hits = fault.hits
        await asyncio.sleep(1.2)  # a retry queued (1 s) finds the session stopped
        assert fault.hits == hits and transcript_starts(emu) == []
    finally:
        await ctl.close()
