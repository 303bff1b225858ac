"""Client tokens stay masked in logs, without the masking growing with every session a long run has served.

Real SDK against the emulator: every `generate_client_token` answer is registered as a secret, as when the
session API creates sessions or refreshes tokens.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
import videodb

from pipeline import secrets
from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.videodb_sdk import client_token
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api import running
from tests.videodb_harness import API_KEY, scenario_file


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[Emulator]:
    e = Emulator(scenario_file(tmp_path, [], end=10), api_key=API_KEY, autostart=False)
    await e.start()
    yield e
    await e.stop()


async def test_many_client_tokens_are_masked_in_memory_that_grows_only_with_the_tokens(emu: Emulator) -> None:
    """Before: every token rebuilt one regex of all tokens so far, and Python's regex cache kept 512 of those:
    about 50 KB more per session made, and a create that got slower with every one (300 sessions: 15 MB)."""
    conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
    tokens = [await client_token("test", conn, 600, API_KEY) for _ in range(5)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            tokens.append(await client_token("test", conn, 600, API_KEY))
        emu.calls.clear()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used < 2_000_000, f"{used} bytes retained for 300 client tokens"
    line = f"create {tokens[0]} refresh {tokens[-1]}, {tokens[150]}."
    assert secrets.mask(line) == "create *** refresh ***, ***."



async def test_a_restart_masks_the_tokens_of_the_live_sessions_it_reattaches(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """The session API masks a client token while its session lives; after a restart that re-attached the
    session, its token was no longer masked (only tokens made in this process were)."""
    async with running(make_context, emulator) as live:
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"})
        assert status == 201, made
    token = made["client_token"]
    secrets.forget(token)  # a new process: nothing it has not registered itself is masked
    async with running(make_context, emulator) as live:
        assert made["session_id"] in live.ctl.manager.sessions
        assert secrets.known(token) and secrets.mask(f"token {token}.") == "token ***."


async def test_a_create_videodb_refused_leaves_its_token_unmasked(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """The token made for a create whose session VideoDB did not make is no session's: it is not kept among the
    masked secrets (before, every failed create, retried by the backend every second while VideoDB failed,
    added one that stayed for the rest of the run)."""
    async with running(make_context, emulator) as live:
        emulator.fault("POST", "/collection/default/capture/session", status=500, times=2)
        for key in (None, "k-1"):  # without a key; with one (its retry masks it again if it finds a session)
            headers = {"Idempotency-Key": key} if key else {}
            status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}, headers=headers)
            assert status == 502 and "create_capture_session" in err["error"], err
            assert not secrets.known(list(emulator.api.client_tokens)[-1])


async def test_a_restart_does_not_mask_the_tokens_of_finished_sessions(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Records of ended sessions read back at a restart: their tokens start nothing any more and are not masked,
    as in the run that saw them end (the masking stays bounded by the live sessions)."""
    records = tmp_path / "sessions"
    records.mkdir(mode=0o700)
    tokens = {}
    for sid, status in (("cap-done", "exported"), ("cap-failed", "failed"), ("cap-live", "active")):
        tokens[sid] = f"ct-{sid}-0123456789abcdef"
        (records / f"{sid}.json").write_bytes(orjson.dumps({
            "session_id": sid, "status": status, "end_user_id": "u", "client_token": tokens[sid]}))
    async with running(make_context, emulator):
        assert {sid: secrets.known(t) for sid, t in tokens.items()} == {
            "cap-done": False, "cap-failed": False, "cap-live": True}
    secrets.forget(tokens["cap-live"])
