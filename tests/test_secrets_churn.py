"""Client tokens stay masked in logs, without the masking growing with every session a long run has served.

Real SDK against the emulator: every `generate_client_token` answer is registered as a secret, as when the
session API creates sessions or refreshes tokens.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import videodb

from pipeline import secrets
from pipeline.emulator import Emulator
from pipeline.videodb_sdk import client_token
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

