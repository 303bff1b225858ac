"""The session API under requests that race each other: real SDK against the emulator, real HTTP.

Each test reproduces a defect found by sending requests at once that a backend (or its retries) can
send at once; each failed before its fix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline import sdk_threads
from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.events import iso_ts
from stages.controller import session_create
from tests.test_session_api import TOKEN, Live, hook, running
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api_attacks import status_of


def stop_calls(emu: Emulator) -> list[tuple[str, str]]:
    """The stop calls VideoDB got (rtstreams, transcripts, indexes), in order."""
    return [(c["method"], c["path"]) for c in list(emu.calls)
            if isinstance(c.get("body"), dict) and c["body"].get("action") == "stop"]


async def active_session(live: Live, emu: Emulator) -> str:
    status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"})
    assert status == 201, body
    sid: str = body["session_id"]
    await hook(live, emu, f"sessions/{sid}/start")
    assert (await status_of(live, sid, "active"))["status"] == "active"
    await live.wait_for(lambda: (p := live.ctl.manager.sessions[sid].pipelines) is not None and bool(p.bound_to))
    return sid



async def create_within(live: Live, limit: float) -> None:
    """A create made while background work is under way is answered (201) within `limit` seconds."""
    began = time.monotonic()
    status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": "new"})
    took = time.monotonic() - began
    assert status == 201, body
    assert took < limit, took

async def test_concurrent_stops_send_each_stop_call_once(emulator: Emulator,
                                                         make_context: Callable[..., Context]) -> None:
    """Five POST /stop at once (a backend's retries, a double click): VideoDB gets each stop call once (before:
    five times each, every request seeing the first one's stop still under way and sending them all again)."""
    async with running(make_context, emulator) as live:
        sid = await active_session(live, emulator)
        answers: list[tuple[int, Any]] = await asyncio.gather(
            *(live.call("POST", f"/v1/sessions/{sid}/stop") for _ in range(5)))
        assert [status for status, _ in answers] == [202] * 5
        assert all(view["stop_requested"] is True for _, view in answers)
        calls = stop_calls(emulator)
        assert len(calls) == len(set(calls)) > 0, calls
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        assert stop_calls(emulator) == calls  # and a later one sends nothing


async def test_a_token_made_while_the_session_is_stopped_is_not_handed_out(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """POST /token, and POST /stop while VideoDB makes that token: 409, as for a token asked after the stop (before:
    200 with a fresh client token for the stopped session, saved in its record), and the token made is not kept
    among the masked secrets (before, if the session ended meanwhile, it stayed masked for the rest of the run)."""
    from pipeline import secrets

    async with running(make_context, emulator) as live:
        sid = await active_session(live, emulator)
        emulator.fault("POST", "/capture/session/token", delay=0.5, times=1)
        asked = len(emulator.api.client_tokens)
        token = asyncio.create_task(live.call("POST", f"/v1/sessions/{sid}/token"))
        await live.wait_for(lambda: len(emulator.api.client_tokens) > asked)  # made; its answer is on its way
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        status, err = await token
        assert status == 409 and err["error"].endswith(": no new token"), err  # stopped (or exported by now)
        made = list(emulator.api.client_tokens)[-1]
        assert live.ctl.manager.sessions[sid].record["client_token"] != made and not secrets.known(made)
        waiting = (await live.call("POST", "/v1/sessions", json={"end_user_id": "v"}))[1]["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{waiting}/stop"))[0] == 202  # before it started
        status, err = await live.call("POST", f"/v1/sessions/{waiting}/token")  # before: "is created: no new token"
        assert status == 409 and err["error"].endswith("was stopped through the API: no new token"), err



@pytest.mark.parametrize("saved", [
    {"status": "created"},  # VideoDB no longer lists them: each is asked for by id after two listings
    {"status": "active", "stop_requested": True, "stop_incomplete": True},  # stops a crash cut short: sent again
], ids=["unlisted", "stops-again"])
async def test_a_restart_with_hundreds_of_sessions_to_ask_about_leaves_threads_for_the_api(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path, saved: dict[str, Any]) -> None:
    """A restart with 300 saved sessions to ask VideoDB about, each GET answered in 0.2 s: that background work
    goes 4 calls at a time, so a create meanwhile is answered at once (before: all 300 were queued for the SDK's
    few worker threads together, and the create waited behind them, 10 s here; with thousands, past the 60 s
    call deadline)."""
    d = tmp_path / "sessions"
    d.mkdir(mode=0o700)
    for i in range(300):
        (d / f"cap-{i:06d}.json").write_bytes(orjson.dumps({
            "session_id": f"cap-{i:06d}", "end_user_id": "u", "metadata": {},
            "created_at": iso_ts(time.time() - 1000 + i), **saved}))
    emulator.fault("GET", "/capture/session/cap-", delay=0.2)
    async with running(make_context, emulator) as live:
        m = live.ctl.manager
        if saved["status"] == "created":
            await live.wait_for(lambda: max(m._unlisted.values(), default=0) >= 2)  # their checks are under way
        await create_within(live, 1.5)

async def test_a_retry_after_a_lost_create_never_takes_the_session_of_a_create_still_under_way(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """A keyed create that made nothing at VideoDB (503), retried while another create for the same end user and
    metadata waits for VideoDB's answer (its session already made): the retry makes its own session (before: it
    took the other create's session for the one it had lost, and both callers were handed that one session, two
    desktop clients with two tokens for it)."""
    body = {"end_user_id": "u", "metadata": {"plan": "pro"}}
    create = "/collection/default/capture/session"
    async with running(make_context, emulator) as live:
        emulator.fault("POST", create, status=503, times=1)
        status, err = await live.call("POST", "/v1/sessions", json=body, headers={"Idempotency-Key": "a"})
        assert status == 502 and not emulator.registry.sessions, err
        emulator.fault("POST", create, delay=1.0, times=1)  # made at once, answered a second later
        other = asyncio.create_task(live.call("POST", "/v1/sessions", json=body, headers={"Idempotency-Key": "b"}))
        await live.wait_for(lambda: len(emulator.registry.sessions) == 1)
        status, retried = await live.call("POST", "/v1/sessions", json=body, headers={"Idempotency-Key": "a"})
        status_b, made = await other
        assert (status, status_b) == (201, 201), (retried, made)
        assert retried["session_id"] != made["session_id"], retried
        assert len(emulator.registry.sessions) == 2


async def test_a_create_whose_record_could_not_be_saved_is_still_found_by_its_key_after_a_restart(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk refuses the new session's record (full): the note the keyed create made before asking VideoDB is
    kept, so after a restart the retry with the key finds the session VideoDB made (before: the note was removed
    though the record was not written, and the retry made a second session, the first one lost)."""
    from pipeline.errors import StageError
    from stages.controller import session_store

    real = session_store.write_private_bytes

    def full_disk(path: Any, text: bytes) -> None:
        if str(path).endswith(".json"):
            raise StageError(f"{path}: cannot write: No space left on device")
        real(path, text)

    body, hdr = {"end_user_id": "u"}, {"Idempotency-Key": "k-disk"}
    async with running(make_context, emulator) as live:
        monkeypatch.setattr(session_store, "write_private_bytes", full_disk)
        status, made = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert status == 201, made
        monkeypatch.setattr(session_store, "write_private_bytes", real)
    async with running(make_context, emulator) as live:  # the record was never written: only the note tells
        status, again = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert (status, again["session_id"]) == (201, made["session_id"]), again
        assert len(emulator.registry.sessions) == 1


async def test_many_sessions_stopping_at_once_leave_threads_for_the_api(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """40 users stop at the same moment (the end of a shift), VideoDB answering get_capture_session in 0.5 s: the
    asks whether each stopped session stored anything go 4 at a time, so a create meanwhile is answered at once
    (before: one ask per `stopped` event, all queued for the SDK's few worker threads together; the create waited
    behind them, and with thousands of sessions past the 60 s call deadline)."""
    async with running(make_context, emulator, on_active={}) as live:
        m = live.ctl.manager
        made = [(await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]["session_id"]
                for i in range(40)]
        await asyncio.gather(*(hook(live, emulator, f"sessions/{sid}/start") for sid in made))
        await live.wait_for(lambda: all(m.sessions[sid].lifecycle.state == "active" for sid in made))
        emulator.fault("GET", "/capture/session/cap-", delay=0.5)
        await asyncio.gather(*(hook(live, emulator, f"sessions/{sid}/stop") for sid in made))
        # (a slow machine sees the first ones exported before the last one stopped: both count)
        await live.wait_for(lambda: all(m.sessions[sid].lifecycle.state in ("stopped", "exported") for sid in made))
        await create_within(live, 1.5)


async def test_a_keyed_create_whose_note_cannot_be_saved_makes_nothing_and_is_503(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """`sessions` is not a directory (removed, a file put in its place; a full disk likewise): the note a keyed
    create saves before asking VideoDB cannot be written. Before: the create went ahead without it, so if its
    answer was lost and the pipeline restarted, the retry with the key could not find the session and made a
    second one. Now: 503 with Retry-After, no session made, one log line; once the disk takes writes, the retry
    makes the session."""
    import logging

    from pipeline import secrets

    records = tmp_path / "sessions"
    body, hdr = {"end_user_id": "u"}, {"Idempotency-Key": "k-note", "Authorization": f"Bearer {TOKEN}"}
    async with running(make_context, emulator) as live:
        records.mkdir(mode=0o700, exist_ok=True)
        records.rmdir()
        records.write_text("not a directory")
        caplog.set_level(logging.ERROR, "pipeline.controller.sessions")
        async with live.http.post(live.url + "/v1/sessions", json=body, headers=hdr) as r:
            status, retry_after, err = r.status, r.headers.get("Retry-After"), await r.json()
        assert (status, retry_after) == (503, "5") and "nothing was made" in err["error"], err
        assert not emulator.registry.sessions
        assert not secrets.known(list(emulator.api.client_tokens)[-1])  # handed to nobody
        notes = [r for r in caplog.records if "cannot save" in r.getMessage() and ".creating" in r.getMessage()]
        assert len(notes) == 1, caplog.records  # (the periodic checkpoint may log its own failed write meanwhile)
        records.unlink()
        status, made = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert status == 201 and list(emulator.registry.sessions) == [made["session_id"]], made


async def test_a_mass_re_bind_after_a_reconnect_leaves_threads_for_the_api(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """40 active sessions when the WebSocket drops, VideoDB answering each re-bind's transcript call in 2 s: the
    re-binds go 4 at a time (with the other background asks), so a create meanwhile is answered at once (before:
    8 at a time, more than the SDK's worker threads on 2 cores, and each of the create's calls waited behind
    them for a free thread)."""
    async with running(make_context, emulator) as live:
        m, link = live.ctl.manager, live.ctl.context.session
        made = [(await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]["session_id"]
                for i in range(40)]
        await asyncio.gather(*(hook(live, emulator, f"sessions/{sid}/start") for sid in made))
        await live.wait_for(lambda: all((p := m.sessions[sid].pipelines) is not None and bool(p.bound_to)
                                        for sid in made), timeout=20)
        first = link.connection_id
        emulator.fault("POST", "/transcription", delay=2.0)
        for cid, conn in list(emulator.hub.live.items()):  # the connection drops: the source reconnects
            emulator.hub._gone(cid)
            await conn.ws.close(code=1012, message=b"test: dropped")
        await live.wait_for(lambda: link.connection_id not in (None, first))
        n = sum(c["path"].endswith("/transcription") for c in list(emulator.calls))
        await live.wait_for(lambda: sum(c["path"].endswith("/transcription") for c in list(emulator.calls)) > n)
        await create_within(live, 1.0)


async def test_a_restart_asks_for_the_sessions_the_listing_left_out_a_few_at_a_time_not_one_by_one(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """24 live sessions saved, none in VideoDB's listing, each GET answered 0.25 s late: the restart asks for
    them 4 at a time (the background bound), about 1.5 s in all (before: one after another, 6 s here; hundreds
    took minutes against a slow VideoDB). The status poll is slowed so that only the restart asks."""
    d = tmp_path / "sessions"
    d.mkdir(mode=0o700)
    n = 24
    for i in range(n):
        (d / f"cap-{i:06d}.json").write_bytes(orjson.dumps({
            "session_id": f"cap-{i:06d}", "end_user_id": "u", "metadata": {}, "status": "created",
            "created_at": iso_ts(time.time() - 1000 + i)}))
    emulator.fault("GET", "/capture/session/cap-", delay=0.25)

    def asked() -> list[dict[str, Any]]:
        return [c for c in list(emulator.calls) if c["method"] == "GET" and "/capture/session/cap-" in c["path"]]

    async with running(make_context, emulator, status_poll_interval=60) as live:
        await live.wait_for(lambda: len(asked()) == n, timeout=3)
        calls = asked()
        assert calls[-1]["at"] - calls[0]["at"] < 2.5, calls[-1]["at"] - calls[0]["at"]
        assert len({c["path"] for c in calls}) == n  # each asked once
        at_once = max(sum(c["at"] <= x["at"] < c["at"] + 0.2 for c in calls) for x in calls)
        assert at_once <= 4, at_once  # never more than the background bound at once


async def test_creates_videodb_is_slow_to_make_leave_threads_for_a_stop_and_a_token(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """VideoDB takes 1.2 s to make each session while a burst of users start recording: a user who stops (or
    needs a new client token) meanwhile is answered at once, and every create still gets its session. Before, the
    creates held every SDK worker thread (6 on two cores) and the stop and the token waited behind them: a token
    took 23 s with 12 creates at 8 s each (and past the 60 s call deadline they failed)."""
    async with running(make_context, emulator) as live:
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "stays"})
        assert status == 201, made
        sid = made["session_id"]
        emulator.fault("POST", "/collection/default/capture/session", delay=1.2)
        burst = [asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))
                 for i in range(sdk_threads.workers() + 2)]
        await live.wait_for(lambda: emulator.faults[0].hits >= 2)  # creates are waiting for VideoDB
        for path in (f"/v1/sessions/{sid}/token", f"/v1/sessions/{sid}/stop"):
            began = time.monotonic()
            status, body = await live.call("POST", path)
            assert status in (200, 202), body
            assert time.monotonic() - began < 0.6, path
        assert [status for status, _ in await asyncio.gather(*burst)] == [201] * len(burst)


async def test_a_create_waiting_for_its_turn_at_shutdown_is_503_at_once_and_makes_nothing(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """Creates VideoDB is slow to make fill their places; one more waits for its turn. A shutdown answers it 503
    (retry after the restart) at once, and VideoDB makes no session for it; those under way still get theirs."""
    async with running(make_context, emulator) as live:
        emulator.fault("POST", "/collection/default/capture/session", delay=1.2)
        places = live.ctl.manager.creator.slots._value
        burst = [asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))
                 for i in range(places + 1)]
        await live.wait_for(lambda: emulator.faults[0].hits == places)
        began = time.monotonic()
        live.ctl.manager.closing()
        status, body = await next(asyncio.as_completed(burst))
        assert (status, body.get("status")) == (503, 503), body
        assert time.monotonic() - began < 0.5
        assert sorted(status for status, _ in await asyncio.gather(*burst)) == [201] * places + [503]
        assert len(emulator.registry.sessions) == places


async def test_a_create_that_waits_too_long_for_its_turn_is_503_and_makes_nothing(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """VideoDB is so slow to make sessions that a create waits past its turn's limit (60 s; 0.3 s here): 503 with
    Retry-After, nothing made for it at VideoDB; the creates ahead of it still get their sessions."""
    monkeypatch.setattr(session_create, "TURN_WAIT", 0.3)
    async with running(make_context, emulator) as live:
        emulator.fault("POST", "/collection/default/capture/session", delay=1.2)
        places = live.ctl.manager.creator.slots._value
        ahead = [asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))
                 for i in range(places)]
        await live.wait_for(lambda: emulator.faults[0].hits == places)
        async with live.http.post(f"{live.url}/v1/sessions", json={"end_user_id": "late"},
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert (r.status, r.headers.get("Retry-After")) == (503, "5"), await r.text()
        assert [status for status, _ in await asyncio.gather(*ahead)] == [201] * places
        assert len(emulator.registry.sessions) == places
