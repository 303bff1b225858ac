"""A session record the disk refused is written once the disk takes writes again, even if nothing else is.

Before, such a record waited for the next write that worked: with no other change to any session (a quiet
server), it stayed in memory only, a stop (SIGTERM) reported it "not written" though the disk took writes
again, and a kill -9 lost the session its 201 had handed out. Real `pipeline run` processes against the
emulator; the disk refuses because `sessions/` is a regular file for a while (chmod does not stop root).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from pipeline.emulator import Emulator
from stages.controller.session_store import SessionStore
from tests.test_session_api import TOKEN, Live, api_config
from tests.test_session_api import emulator as emulator  # the shared fixture


class Run:
    """`pipeline run` of the session API config in its own process; `url` once its API listens."""

    def __init__(self, tmp_path: Path, emu: Emulator) -> None:
        self.config, self.cwd = api_config(tmp_path, emu), tmp_path
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self) -> str:
        env = {**os.environ, "SESSION_API_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.cli", "run", str(self.config), cwd=self.cwd, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        async with asyncio.timeout(40):
            while not (m := re.search(r"session API on (http://\S+)/v1/sessions", "".join(self.lines))):
                line = (await self.proc.stderr.readline()).decode()
                assert line, "".join(self.lines)
                self.lines.append(line)
        return m.group(1)

    async def wait_log(self, text: str) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async with asyncio.timeout(10):
            while text not in "".join(self.lines):
                line = (await self.proc.stderr.readline()).decode()
                assert line, "".join(self.lines)
                self.lines.append(line)

    async def stop(self, sig: int) -> str:
        """Send `sig`, wait for the exit; the rest of its stderr."""
        assert self.proc is not None and self.proc.stderr is not None
        self.proc.send_signal(sig)
        rest = (await asyncio.wait_for(self.proc.stderr.read(), 30)).decode()
        await asyncio.wait_for(self.proc.wait(), 30)
        return rest

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as h:
        yield h


async def refused_create(tmp_path: Path, emu: Emulator, run: Run, http: aiohttp.ClientSession) -> Path:
    """A create answered while `sessions/` cannot be written; then the directory is back. Its record's path."""
    live = Live(None, http, await run.start())  # type: ignore[arg-type]
    sessions = tmp_path / "state" / "sessions"
    status, first = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"})
    assert status == 201, first
    assert (sessions / f"{first['session_id']}.json").exists()
    sessions.rename(tmp_path / "aside")
    sessions.write_text("not a directory")  # every write in sessions/ now fails
    status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "b"})
    assert status == 201, made  # it exists at VideoDB and its client has the token: a retry would make another
    await run.wait_log("cannot save")
    sessions.unlink()
    (tmp_path / "aside").rename(sessions)  # the disk takes writes again; nothing else changes
    return sessions / f"{made['session_id']}.json"


async def test_sigterm_writes_a_record_the_disk_refused_once_it_takes_writes_again(
        tmp_path: Path, emulator: Emulator, http: aiohttp.ClientSession) -> None:
    run = Run(tmp_path, emulator)
    try:
        record = await refused_create(tmp_path, emulator, run, http)
        rest = await run.stop(signal.SIGTERM)
        assert run.proc is not None and run.proc.returncode == 0, "".join(run.lines) + rest
        assert "not written" not in rest and "Traceback" not in rest, rest
        assert orjson.loads(record.read_bytes())["end_user_id"] == "b"
    finally:
        run.kill()


def test_a_record_the_disk_refused_is_written_soon_though_nothing_else_is(tmp_path: Path) -> None:
    """Without a stop or another write: the record is on disk within seconds, so a kill -9 then keeps it."""
    store = SessionStore(tmp_path)
    store.dir.write_text("not a directory")
    store.save({"session_id": "cap-a", "status": "created"})
    assert store.flush(5) and not store.path("cap-a").exists()
    store.dir.unlink()
    deadline = time.monotonic() + 5
    while not store.path("cap-a").exists():
        assert time.monotonic() < deadline, "the refused record was never written again"
        time.sleep(0.02)
    assert orjson.loads(store.path("cap-a").read_bytes())["status"] == "created"
