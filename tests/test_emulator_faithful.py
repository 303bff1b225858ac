"""The emulator does what VideoDB's capture reference describes, not more leniently: real SDK, real HTTP.

Where the emulator was more lenient than VideoDB, the pipeline's tests passed against something VideoDB
does not do; each test here failed on the emulator before it was made faithful.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from pipeline.emulator import Emulator

KEY = "k-faithful-0123456789"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(speed=0, autostart=False, api_key=KEY)
    await e.start()
    yield e
    await e.stop()


async def test_a_client_token_expires(emu: Emulator) -> None:
    """`generate_client_token(expires_in)`: the token stops working when it expires (it never did), both for
    the desktop client's start and as the SDK's session token."""
    import videodb
    from videodb.exceptions import AuthenticationError

    conn = videodb.connect(api_key=KEY, base_url=emu.base_url)
    short = await asyncio.to_thread(conn.generate_client_token, 1)
    long = await asyncio.to_thread(conn.generate_client_token, 600)
    session = await asyncio.to_thread(conn.create_capture_session, end_user_id="u")
    client = videodb.connect(session_token=short, base_url=emu.base_url)
    assert (await asyncio.to_thread(client.get_capture_session, session.id)).id == session.id
    await asyncio.sleep(1.1)
    with pytest.raises(AuthenticationError, match="client token expired"):
        await asyncio.to_thread(client.get_capture_session, session.id)
    async with aiohttp.ClientSession() as http:
        url = f"{emu.base_url}/_emulator/sessions/{session.id}/start"
        for token, status in ((short, 401), ("ct-never-issued", 401), (long, 200)):
            async with http.post(url, json={"client_token": token}) as r:
                assert r.status == status, (token, await r.text())


async def test_a_session_is_found_only_in_its_own_collection(emu: Emulator) -> None:
    """`get_capture_session(id, collection_id)`: the emulator answered for any collection, so a call that
    named the wrong one (or left the SDK's "default") passed the tests with another collection configured."""
    import videodb
    from videodb.exceptions import InvalidRequestError

    conn = videodb.connect(api_key=KEY, base_url=emu.base_url)
    made = await asyncio.to_thread(conn.create_capture_session, end_user_id="u", collection_id="c-team")
    assert (await asyncio.to_thread(conn.get_capture_session, made.id, "c-team")).status == "created"
    with pytest.raises(InvalidRequestError, match="not found"):
        await asyncio.to_thread(conn.get_capture_session, made.id)
    assert [s.id for s in await asyncio.to_thread(conn.list_capture_sessions, "c-team")] == [made.id]
    assert await asyncio.to_thread(conn.list_capture_sessions) == []


async def test_lifecycle_events_stay_with_the_connection_the_session_was_created_with(emu: Emulator) -> None:
    """Only `create_capture_session(ws_connection_id)` says where lifecycle events go. Re-binding a transcript
    to a new connection made the emulator send the session's lifecycle events there too, so the controller's
    tests saw `exported` after a reconnect that VideoDB would have sent to the dead connection."""
    import videodb

    conn = videodb.connect(api_key=KEY, base_url=emu.base_url)
    ws_url = f"{emu.base_url.replace('http', 'ws')}/ws"
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(ws_url)
        a = (await first.receive_json())["connection_id"]
        session = await asyncio.to_thread(conn.create_capture_session, end_user_id="u", ws_connection_id=a)
        async with http.post(f"{emu.base_url}/_emulator/sessions/{session.id}/start") as r:
            assert r.status == 200
        while (await first.receive_json()).get("event") != "capture_session.active":  # created, starting
            pass
        mic = next(s for s in emu.registry.sessions[session.id].streams.values() if s.type == "mic")
        rts = (await asyncio.to_thread(conn.get_capture_session, session.id)).get_rtstream("mic")[0]
        await asyncio.to_thread(rts.start_transcript, ws_connection_id=a)
        await first.close()
        second = await http.ws_connect(ws_url)
        b = (await second.receive_json())["connection_id"]
        await asyncio.to_thread(rts.start_transcript, ws_connection_id=b)  # the pipeline re-binds
        assert emu.registry.transcripts[mic.rtstream_id].conn == b
        async with http.post(f"{emu.base_url}/_emulator/sessions/{session.id}/stop") as r:
            assert r.status == 200
        await emu.wait_finished()
        got: list[str] = []
        while True:
            try:
                msg = await second.receive_json(timeout=0.3)
            except TimeoutError:
                break
            got.append(msg.get("event") or msg.get("channel"))
        assert not [e for e in got if str(e).startswith("capture_session.")], got
        sent_to_a = [r for r in emu.emitted if r["connection_id"] == a and r["event"].get("event")]
        assert [r["event"]["event"] for r in sent_to_a][-1] == "capture_session.exported"
        assert not sent_to_a[-1]["live"]  # produced for the dead connection, never sent
        await second.close()
