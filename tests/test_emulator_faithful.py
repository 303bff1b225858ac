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
