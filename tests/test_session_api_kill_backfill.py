"""Session API, `kill -9` twice: what the first run's scene index produced in its gap is still backfilled."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.emulator import Emulator
from tests.test_session_api import Live, api_config, cues, hook, lines_of, start_pipeline
from tests.videodb_harness import API_KEY, scenario_file


def in_file(out: Path, sid: str, channel: str) -> set[tuple[Any, Any]]:
    """(rtstream id, start) of the session's `channel` events in its `{capture_session_id}` file."""
    return {(e.get("rtstream_id"), e["data"]["start"]) for e in lines_of(out / f"{sid}.jsonl")
            if e.get("channel") == channel}


async def stop_cleanly(proc: asyncio.subprocess.Process, log: list[str]) -> None:
    """SIGTERM the pipeline: it exits 0 within 20 s."""
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0, "".join(log)


async def tear_down(proc: asyncio.subprocess.Process | None, http: aiohttp.ClientSession, emu: Emulator) -> None:
    """Kill a pipeline still running (a failed test), close the client, stop the emulator."""
    if proc is not None and proc.returncode is None:
        proc.kill()
        await proc.wait()
    await http.close()
    await emu.stop()


async def test_a_second_kill_before_the_gap_was_backfilled_keeps_the_replaced_index(tmp_path: Path) -> None:
    """Found by `python -m bench.soak --sessions 8 --minutes 2 --seed 1`: a restart re-binds a session (new scene
    index; the crashed run's index, which holds what was produced while no run was connected, is replaced) and
    its backfill fails (VideoDB 500). The replaced index was kept for the next re-bind in memory only: the
    session's file named just the new index, so a second `kill -9` before a backfill worked lost the first gap's
    visual-index events for good. Now the file names the replaced indexes too until their gap is backfilled."""
    emu = Emulator(scenario_file(tmp_path, cues(600), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    config = api_config(tmp_path, emu)
    out = tmp_path / "by-session"
    http = aiohttp.ClientSession()
    proc: asyncio.subprocess.Process | None = None

    def visual(pred: Any = lambda r: True) -> set[tuple[Any, Any]]:
        return {(r["event"]["rtstream_id"], r["event"]["data"]["start"]) for r in emu.emitted
                if r["event"].get("channel") == "visual_index" and pred(r)}

    def written(sid: str) -> set[tuple[Any, Any]]:
        return in_file(out, sid, "visual_index")

    try:
        proc, url, _ = await start_pipeline(config, tmp_path)
        live = Live(None, http, url)  # type: ignore[arg-type]
        status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": "u1"},
                                       headers={"Idempotency-Key": "key-u1"})
        assert status == 201, body
        sid = body["session_id"]
        await hook(live, emu, f"sessions/{sid}/start")
        await live.wait_for(lambda: len(written(sid)) >= 2)
        proc.kill()
        await proc.wait()
        gap = len(visual(lambda r: not r["live"]))
        await live.wait_for(lambda: len(visual(lambda r: not r["live"])) >= gap + 3)  # produced for a dead run

        scenes = emu.fault("GET", "/index/scene/", status=500)  # every get_scenes: the backfill fails
        proc, url, log = await start_pipeline(config, tmp_path)
        await live.wait_for(lambda: "visual_index failed" in "".join(log) and scenes.hits > 0)
        proc.kill()  # before any backfill of the first gap worked
        await proc.wait()
        emu.faults.clear()

        want = visual()  # everything produced so far: the first gap's events among them
        proc, url, log = await start_pipeline(config, tmp_path)
        try:
            await live.wait_for(lambda: want <= written(sid), timeout=10)
        except TimeoutError:
            raise AssertionError(f"never written: {sorted(want - written(sid))}") from None
        await stop_cleanly(proc, log)
    finally:
        await tear_down(proc, http, emu)


@pytest.mark.parametrize("failed_reads", [0, 2])
async def test_a_session_that_stopped_while_no_run_was_up_still_gets_its_last_events(
        tmp_path: Path, failed_reads: int) -> None:
    """Found by `python -m bench.soak --sessions 8 --minutes 2 --seed 5`: a `kill -9` came just before a
    session's last events, and it stopped before the restart. The restart re-attached it as `stopping` and
    backfilled only sessions still active, so what it produced after the last checkpoint was never written.
    Now a session that was active and moved on while no run was up is backfilled (no re-bind) first.
    `failed_reads`: VideoDB answers the restart's first transcript reads 500 (both audio streams'); that backfill
    was its only one (no re-bind or reconnect comes for an ended session), so those events were lost for good.
    Now a fetch worth another try is tried again after status_poll_interval (a few times)."""
    emu = Emulator(scenario_file(tmp_path, cues(600), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    config = api_config(tmp_path, emu)
    out = tmp_path / "by-session"
    http = aiohttp.ClientSession()
    proc: asyncio.subprocess.Process | None = None

    def transcripts(sid: str) -> set[tuple[Any, Any]]:
        return in_file(out, sid, "transcript")

    try:
        proc, url, _ = await start_pipeline(config, tmp_path)
        live = Live(None, http, url)  # type: ignore[arg-type]
        status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": "u1"})
        assert status == 201, body
        sid = body["session_id"]
        await hook(live, emu, f"sessions/{sid}/start")
        await live.wait_for(lambda: len(transcripts(sid)) >= 3)
        proc.kill()
        await proc.wait()
        gap = sum(1 for r in emu.emitted if not r["live"])
        await live.wait_for(lambda: sum(1 for r in emu.emitted if not r["live"]) >= gap + 3)
        await hook(live, emu, f"sessions/{sid}/stop")  # the desktop client stops while no run is up
        await live.wait_for(lambda: emu.registry.sessions[sid].status == "exported")
        want = {(r["event"]["rtstream_id"], r["event"]["data"]["start"]) for r in emu.emitted
                if r["event"].get("channel") == "transcript"}

        failing = emu.fault("GET", "/transcription", status=500, times=failed_reads) if failed_reads else None
        proc, url, log = await start_pipeline(config, tmp_path)
        live.url = url
        try:
            await live.wait_for(lambda: want <= transcripts(sid), timeout=8)
        except TimeoutError:
            raise AssertionError(f"never written: {sorted(want - transcripts(sid))[:5]}") from None
        assert failing is None or failing.hits == failed_reads
        status, got = await live.call("GET", f"/v1/sessions/{sid}")
        assert (status, got["status"]) == (200, "exported")
        assert not (out / "unknown.jsonl").exists()  # backfilled after it ended, still under its id
        await stop_cleanly(proc, log)
    finally:
        await tear_down(proc, http, emu)
