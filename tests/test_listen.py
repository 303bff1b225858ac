"""`pipeline listen` as users run it: a subprocess against the emulator, real SDK, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.emulator import Emulator
from pipeline.listen import output_dir
from tests.videodb_harness import API_KEY

REPO = Path(__file__).resolve().parents[1]
PIPELINE = Path(sys.executable).parent / "pipeline"
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
async def emulator() -> AsyncIterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(**kw: Any) -> Emulator:
        emu = Emulator(**{"speed": 0, "api_key": API_KEY, **kw})
        made.append(emu)
        return emu

    yield make
    for emu in made:
        await emu.stop()


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("VIDEODB_EVENTS_DIR", "XDG_STATE_HOME", "VIDEO_DB_BASE_URL", "VIDEO_DB_API_KEY")}
    e.update(HOME=str(tmp_path / "home"), VIDEO_DB_API_KEY=API_KEY, PYTHONUNBUFFERED="1", **extra)
    return e


async def spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*args, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)


@contextlib.asynccontextmanager
async def listening(*args: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`spawn`, killed on the way out if a failed check left it running."""
    proc = await spawn(*args, env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> tuple[bytes, bytes]:
    """Signal `proc` and collect what it printed (20 s at most)."""
    proc.send_signal(sig)
    return await asyncio.wait_for(proc.communicate(), 20)


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_module_run_clear_first_connect_only_then_sigterm(emulator: Callable[..., Emulator],
                                                                tmp_path: Path) -> None:
    import videodb

    emu = emulator(drop_after=3)
    await emu.start()
    out = tmp_path / "events"
    out.mkdir(mode=0o700)
    (out / "videodb_events.jsonl").write_text('{"stale": true}\n')
    async with listening(sys.executable, "-m", "pipeline.listen", "--clear", str(out), "--base-url", emu.base_url,
                         env=env(tmp_path)) as proc:
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
        assert re.fullmatch(r"WS_ID=ws-[0-9a-f]+\n", first), first
        ws_id = first.strip().split("=", 1)[1]
        assert (out / "videodb_ws_id").read_text() == ws_id
        assert (out / "videodb_ws_pid").read_text() == str(proc.pid)
        assert (out / "videodb_events.jsonl").read_text() == ""  # --clear on the first connect

        # created, starting, active reach the listener; then the emulator drops the socket
        conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
        await asyncio.to_thread(conn.create_capture_session, end_user_id="u", ws_connection_id=ws_id)
        await eventually(lambda: (out / "videodb_ws_id").read_text() != ws_id)
        events = lines(out / "videodb_events.jsonl")
        assert [e["event"] for e in events] == ["capture_session.created", "capture_session.starting",
                                                "capture_session.active"]  # not cleared by the reconnect
        assert all(ISO_MS_Z.match(e["ts"]) and isinstance(e["unix_ts"], float) for e in events)
        for name in ("videodb_events.jsonl", "videodb_ws_id", "videodb_ws_pid"):
            assert mode(out / name) == 0o600, name
        assert mode(out) == 0o700

        rest, err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    assert b"WS_ID=" not in rest  # printed once, on the first connect only
    assert not (out / "videodb_ws_pid").exists()
    assert b"Traceback" not in err


async def test_cli_listen_uses_env_dir_and_dead_letters_garbage(emulator: Callable[..., Emulator],
                                                                 tmp_path: Path) -> None:
    import videodb

    emu = emulator(garbage_every=10)
    await emu.start()
    out = tmp_path / "from-env" / "videodb"
    async with listening(str(PIPELINE), "listen", env=env(tmp_path, VIDEODB_EVENTS_DIR=str(out),
                                                         VIDEO_DB_BASE_URL=emu.base_url)) as proc:
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
        ws_id = first.strip().removeprefix("WS_ID=")
        assert first.startswith("WS_ID=") and (out / "videodb_ws_id").read_text() == ws_id
        assert mode(out) == 0o700

        conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
        session = await asyncio.to_thread(conn.create_capture_session, end_user_id="u", ws_connection_id=ws_id)
        await eventually(lambda: any(e.get("status") == "active" for e in lines(out / "videodb_events.jsonl")))
        live = await asyncio.to_thread(conn.get_capture_session, session.id)
        for rts in live.get_rtstream("mic"):
            await asyncio.to_thread(rts.start_transcript, ws_connection_id=ws_id)
        await eventually(lambda: any(e.get("status") == "exported" for e in lines(out / "videodb_events.jsonl")))

        rest, err = await stop(proc, signal.SIGINT)
    assert proc.returncode == 0, err.decode()
    got = lines(out / "videodb_events.jsonl")
    assert [{k: v for k, v in e.items() if k not in ("ts", "unix_ts")} for e in got] == \
        [e["event"] for e in emu.emitted]
    assert sum(e.get("channel") == "transcript" for e in got) > 5
    assert b"[transcript] " in rest  # a preview line per event with text, like VideoDB's ws_listener.py
    dead = lines(out / "videodb_dead_letter.jsonl")
    assert len(dead) == emu.hub.garbage_sent > 0 and mode(out / "videodb_dead_letter.jsonl") == 0o600
    assert not (out / "videodb_ws_pid").exists()


@pytest.mark.parametrize("how", ["pipeline", "module"])
async def test_listen_takes_the_log_options_as_every_subcommand(emulator: Callable[..., Emulator],
                                                                 tmp_path: Path, how: str) -> None:
    """`pipeline listen --help` did not list --log-level and --log-format (every other subcommand takes them)
    and `python -m pipeline.listen` refused them as unrecognized arguments: now both forms list and take them."""
    emu = emulator()
    await emu.start()
    cmd = [str(PIPELINE), "listen"] if how == "pipeline" else [sys.executable, "-m", "pipeline.listen"]
    shown = await spawn(*cmd, "--help", env=env(tmp_path))
    text = (await asyncio.wait_for(shown.communicate(), 20))[0].decode()
    assert "--log-level {debug,info,warning,error}" in text and "--log-format {text,json}" in text, text
    async with listening(*cmd, str(tmp_path / "out"), "--base-url", emu.base_url, "--log-format", "json",
                         "--log-level", "info", env=env(tmp_path)) as proc:
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
        assert first.startswith("WS_ID="), first
        _, err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    logged = [json.loads(line) for line in err.decode().splitlines()]  # JSON lines only
    assert any("connected" in e["message"] and e["level"] == "info" for e in logged), logged


async def test_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    proc = await spawn(sys.executable, "-m", "pipeline.listen", str(link), "--base-url", "http://127.0.0.1:9",
                       env=env(tmp_path))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert out == b""
    assert err.decode().strip() == f"pipeline listen: {link}: refusing a symlinked directory (-> {real}); " \
                                   "give the real path"
    assert list(real.iterdir()) == []


async def test_missing_api_key_is_one_line(tmp_path: Path) -> None:
    e = env(tmp_path)
    del e["VIDEO_DB_API_KEY"]
    proc = await spawn(sys.executable, "-m", "pipeline.listen", str(tmp_path / "x"), env=e)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out) == (1, b"")
    assert err.decode() == "pipeline listen: VIDEO_DB_API_KEY is not set\n"


def test_output_dir_precedence(tmp_path: Path) -> None:
    assert output_dir("given", {"VIDEODB_EVENTS_DIR": "/env"}) == Path("given")
    assert output_dir(None, {"VIDEODB_EVENTS_DIR": "/env", "XDG_STATE_HOME": "/xdg"}) == Path("/env")
    assert output_dir(None, {"XDG_STATE_HOME": "/xdg"}) == Path("/xdg/videodb")
    assert output_dir(None, {}) == Path.home() / ".local" / "state" / "videodb"


async def test_symlinked_ws_id_file_fails_once(emulator: Callable[..., Emulator], tmp_path: Path) -> None:
    """Before: every connect failed to write videodb_ws_id and was retried forever with backoff."""
    emu = emulator()
    await emu.start()
    out = tmp_path / "events"
    out.mkdir(mode=0o700)
    (out / "videodb_ws_id").symlink_to(tmp_path / "elsewhere")
    proc = await spawn(sys.executable, "-m", "pipeline.listen", str(out), "--base-url", emu.base_url,
                       env=env(tmp_path))
    stdout, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and stdout == b""
    assert err.decode() == f"pipeline listen: {out}/videodb_ws_id: refusing to write through a symlink\n"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(("url", "why"), [
    ("notaurl", "expected an http(s) URL such as https://api.videodb.io, got 'notaurl'"),
    ("http://[::1", "expected an http(s) URL such as https://api.videodb.io, got 'http://[::1'"),
    ("http://127.0.0.1:99999", "the port must be a number from 1 to 65535, got 'http://127.0.0.1:99999'"),
])
async def test_a_malformed_base_url_is_one_line_not_endless_retries(tmp_path: Path, url: str, why: str) -> None:
    """Before: every connect failed on the URL itself and was retried with backoff until max_retries."""
    proc = await spawn(sys.executable, "-m", "pipeline.listen", str(tmp_path / "x"), "--base-url", url,
                       env=env(tmp_path))
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert (proc.returncode, out) == (2, b"")
    assert err.decode() == f"pipeline listen: --base-url: {why}\n"
