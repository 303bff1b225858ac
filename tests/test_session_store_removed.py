"""`sessions/` (or the whole state_dir) removed while the pipeline runs: every session is back after a restart.

Before, a later write made the directory again, but the records not saved since were gone: a restart (after
a kill -9) knew nothing of those sessions (their events were no longer re-attached nor backfilled). Now the
store notices the directory was removed or replaced, at the next write or within seconds when nothing is
written, and writes every record held in memory again. Real `pipeline run` processes against the emulator.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pipeline.emulator import Emulator
from stages.controller.session_store import SessionStore
from tests.test_session_api import Live
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_store_refused import Run

WARNING = "was removed or replaced while running; writing the"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as h:
        yield h


async def _create(live: Live, user: str) -> str:
    status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": user})
    assert status == 201, made
    return str(made["session_id"])


async def _end(run: Run) -> None:
    run.kill()
    if run.proc is not None:
        await run.proc.wait()


async def _back_after_kill(run: Run, tmp_path: Path, emu: Emulator, http: aiohttp.ClientSession,
                           made: list[str]) -> None:
    """kill -9, a restart: it knows every session made. The killed run's log is read to its end."""
    assert run.proc is not None and run.proc.stderr is not None
    await _end(run)
    run.lines.append((await run.proc.stderr.read()).decode())
    again = Run(tmp_path, emu)
    try:
        live = Live(None, http, await again.start())  # type: ignore[arg-type]
        for sid in made:
            status, got = await live.call("GET", f"/v1/sessions/{sid}")
            assert status == 200, (sid, got)
    finally:
        await _end(again)


async def _all_on_disk(sessions: Path, made: list[str], timeout: float) -> None:
    """Until every record is a file (or `timeout` seconds: the restart then shows what is missing)."""
    try:
        async with asyncio.timeout(timeout):
            while not all((sessions / f"{sid}.json").exists() for sid in made):
                await asyncio.sleep(0.02)
    except TimeoutError:
        pass


async def test_sessions_dir_removed_then_a_write_brings_every_record_back(
        tmp_path: Path, emulator: Emulator, http: aiohttp.ClientSession) -> None:
    run = Run(tmp_path, emulator)
    try:
        live = Live(None, http, await run.start())  # type: ignore[arg-type]
        made = [await _create(live, user) for user in ("a", "b", "c")]
        sessions = tmp_path / "state" / "sessions"
        assert all((sessions / f"{sid}.json").exists() for sid in made)
        shutil.rmtree(sessions)
        made.append(await _create(live, "d"))  # one write: it makes the directory again
        await _all_on_disk(sessions, made, 1.5)  # sooner than the look every 2 s while nothing is written
        await _back_after_kill(run, tmp_path, emulator, http, made)
        assert "".join(run.lines).count(WARNING) == 1, "".join(run.lines)
    finally:
        await _end(run)


async def test_state_dir_removed_while_nothing_is_written_brings_every_record_back(
        tmp_path: Path, emulator: Emulator, http: aiohttp.ClientSession) -> None:
    run = Run(tmp_path, emulator)
    try:
        live = Live(None, http, await run.start())  # type: ignore[arg-type]
        made = [await _create(live, user) for user in ("a", "b")]
        sessions = tmp_path / "state" / "sessions"
        assert all((sessions / f"{sid}.json").exists() for sid in made)
        shutil.rmtree(tmp_path / "state")  # no request comes: nothing of the sessions changes
        await _all_on_disk(sessions, made, 5)
        await _back_after_kill(run, tmp_path, emulator, http, made)
        assert "".join(run.lines).count(WARNING) == 1, "".join(run.lines)
    finally:
        await _end(run)


def test_the_store_notices_its_directory_removed_or_replaced_at_a_write_and_at_a_look(tmp_path: Path) -> None:
    """Once per removal, in the writer thread: at the next write, or at `check()` while nothing is written."""
    store = SessionStore(tmp_path)
    lost: list[bool] = []
    store.on_lost = lambda: lost.append(store.dir.is_dir())
    store.save({"session_id": "cap-a", "status": "created"})
    store.check()
    assert store.flush() and lost == []
    shutil.rmtree(store.dir)
    store.save({"session_id": "cap-b", "status": "created"})
    store.save({"session_id": "cap-c", "status": "created"})
    assert store.flush() and lost == [True]  # once, not for each write into the directory made again
    store.dir.rename(tmp_path / "aside")
    store.dir.mkdir()  # another directory in its place
    store.check()
    assert store.flush() and lost == [True, True]
    shutil.rmtree(store.dir)
    store.check()  # nothing written: the look makes the directory again
    store.check()
    assert store.flush() and lost == [True, True, True]
