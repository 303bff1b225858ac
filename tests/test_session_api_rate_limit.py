"""A VideoDB rate limit (429, or a 503 with Retry-After) during a create, stop or token call: the session API
answers 503 + Retry-After.

Before, it answered 502 (a broken upstream) without telling the client when to come back. Real SDK against
the emulator answering 429 with and without `Retry-After`, real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_session_api import TOKEN, Live, hook, running, session_calls
from tests.test_session_api import emulator as emulator  # the shared fixture

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def post(live: Live, path: str, body: dict[str, Any] | None = None) -> tuple[int, str | None, Any]:
    """(status, Retry-After header, JSON body)."""
    async with live.http.post(live.url + path, json=body or {}, headers=AUTH) as r:
        return r.status, r.headers.get("Retry-After"), await r.json()


async def test_a_rate_limited_create_is_503_with_videodbs_retry_after_bounded(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    emu = emulator
    token_path, create_path = "/capture/session/token", "/collection/default/capture/session"
    async with running(make_context, emu) as live:
        await asyncio.wait_for(live.ctl.context.session.wait_connection(), 10)
        emu.fault("POST", token_path, status=429, times=1, headers={"Retry-After": "7"})
        status, wait, err = await post(live, "/v1/sessions", {"end_user_id": "a"})
        assert (status, wait) == (503, "7"), err
        assert err["status"] == 503 and "generate_client_token failed: HTTP 429" in err["error"]
        assert "retry in 7s" in err["error"] and session_calls(emu) == []

        emu.fault("POST", create_path, status=429, times=1)  # no Retry-After from VideoDB: our default
        status, wait, err = await post(live, "/v1/sessions", {"end_user_id": "a"})
        assert (status, wait) == (503, "5") and "create_capture_session failed: HTTP 429" in err["error"], err

        emu.fault("POST", token_path, status=429, times=1, headers={"Retry-After": "86400"})  # bounded
        assert (await post(live, "/v1/sessions", {"end_user_id": "a"}))[:2] == (503, "300")
        emu.fault("POST", token_path, status=429, times=1, headers={"Retry-After": "0"})
        assert (await post(live, "/v1/sessions", {"end_user_id": "a"}))[:2] == (503, "1")

        emu.fault("POST", token_path, status=503, times=1, headers={"Retry-After": "9"})  # busy, says when
        status, wait, err = await post(live, "/v1/sessions", {"end_user_id": "a"})
        assert (status, wait) == (503, "9") and "HTTP 503" in err["error"] and "retry in 9s" in err["error"], err
        emu.fault("POST", token_path, status=503, times=1)  # busy, says nothing: a broken upstream as before
        assert (await post(live, "/v1/sessions", {"end_user_id": "a"}))[:2] == (502, None)
        emu.fault("POST", token_path, status=500, times=1, headers={"Retry-After": "7"})  # not a rate limit
        status, wait, _ = await post(live, "/v1/sessions", {"end_user_id": "a"})
        assert (status, wait) == (502, None)
        assert (await post(live, "/v1/sessions", {"end_user_id": "a"}))[0] == 201
        assert [c["status"] for c in session_calls(emu)] == [429, 200]  # the refused create made nothing
        assert len(emu.registry.sessions) == 1


async def test_a_rate_limited_stop_or_token_is_503_with_retry_after(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    emu = emulator
    async with running(make_context, emu) as live:
        sid = (await post(live, "/v1/sessions", {"end_user_id": "u"}))[2]["session_id"]

        emu.fault("POST", "/capture/session/token", status=429, times=1, headers={"Retry-After": "12"})
        status, wait, err = await post(live, f"/v1/sessions/{sid}/token")
        assert (status, wait) == (503, "12") and "generate_client_token" in err["error"], err
        status, wait, fresh = await post(live, f"/v1/sessions/{sid}/token")
        assert (status, wait) == (200, None) and fresh["client_token"].startswith("ct-")

        await hook(live, emu, f"sessions/{sid}/start")
        await live.wait_for(lambda: live.ctl.manager.get(sid).lifecycle.state == "active"
                            and live.ctl.manager.get(sid).pipelines is not None
                            and live.ctl.manager.get(sid).pipelines.bound_to is not None, timeout=10)
        later = formatdate(time.time() + 20, usegmt=True)  # an HTTP-date is a Retry-After too
        emu.fault("PATCH", "/status", status=429, times=1, headers={"Retry-After": later})
        status, wait, err = await post(live, f"/v1/sessions/{sid}/stop")
        assert status == 503 and wait is not None and 18 <= int(wait) <= 21, (wait, err)
        assert "HTTP 429" in err["error"] and "POST /stop again" in err["error"]
        status, wait, view = await post(live, f"/v1/sessions/{sid}/stop")  # the retry goes through
        assert (status, wait) == (202, None) and view["stop_requested"] is True


async def test_our_own_503s_carry_retry_after(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """No WebSocket connection yet, or shutting down: 503 with `Retry-After` (before: none, so a backend's HTTP
    client had nothing to back off by and retried at once)."""
    async with running(make_context, emulator, ingest=False, connect_timeout=0.2) as live:
        status, wait, err = await post(live, "/v1/sessions", {"end_user_id": "a"})
        assert (status, wait) == (503, "2") and "no WebSocket connection" in err["error"], err
    async with running(make_context, emulator, ingest=False, connect_timeout=60) as live:
        waiting = asyncio.create_task(post(live, "/v1/sessions", {"end_user_id": "a"}))
        await live.wait_for(lambda: live.ctl.manager.creator.creating == 1)
        await asyncio.wait_for(live.ctl.close(), 10)
        status, wait, err = await asyncio.wait_for(waiting, 5)
        assert (status, wait) == (503, "2") and "shutting down" in err["error"], err
    assert session_calls(emulator) == []


async def test_a_hostile_retry_after_from_videodb_still_gives_a_bounded_503(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """A `Retry-After` of 400 digits read as infinity, and rounding it up raised OverflowError: the create
    got no 503 (the client was never told to come back). Every value VideoDB can send gives 1..300 s."""
    emu = emulator
    token_path = "/capture/session/token"
    far = formatdate(time.time() + 10 * 365 * 86400, usegmt=True)
    cases = [("9" * 400, "300"), (far, "300"), ("Thu, 01 Jan 1970 00:00:00 GMT", "1"), ("-3", "5"),
             ("1e400", "5"), ("nan", "5"), ("7, 9", "5"), ("\u0663", "5")]
    async with running(make_context, emu) as live:
        await asyncio.wait_for(live.ctl.context.session.wait_connection(), 10)
        for value, expected in cases:
            emu.fault("POST", token_path, status=429, times=1, headers={"Retry-After": value})
            status, wait, err = await post(live, "/v1/sessions", {"end_user_id": "a"})
            assert (status, wait) == (503, expected), (value[:20], err)
        assert (await post(live, "/v1/sessions", {"end_user_id": "a"}))[0] == 201
