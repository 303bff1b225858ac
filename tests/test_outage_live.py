"""A WebSocket outage as it lasts: every live view counts it, not only once it ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

import pipeline.http.view as view_module
from pipeline.http.view import View
from pipeline.statusline import format_status, status_fields
from pipeline.summary import summary_dict
from tests.broker import free_port
from tests.operator_harness import get_json, scrape, served
from tests.procs import ROOT, communicate

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


async def _status(base: str) -> dict[str, Any]:
    return (await get_json(base, "/api/status"))[1]  # type: ignore[no-any-return]


async def test_an_outage_counts_in_metrics_status_and_status_line_while_it_lasts(tmp_path: Path) -> None:
    """Before: `videodb_pipeline_websocket_disconnected_seconds_total` and `/api/status`'s `gap_seconds` moved
    only at the reconnect, so a 6-minute outage showed 0.004 s without a connection until it ended; the status
    line, `pipeline top` and the page said `disconnected` without for how long."""
    port = free_port()
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: outage
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.05, backoff_max: 0.1}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
runtime: {{http: "127.0.0.1:0", status_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send('{"connection_id": "c-1"}')
        await ws.send('{"channel": "transcript", "data": {"text": "hi"}}')
        await ws.wait_closed()

    async with served(p) as (rt, base):
        run = asyncio.create_task(rt.run())
        async with websockets.serve(handler, "127.0.0.1", port):
            while (await get_json(base, "/api/status"))[1]["source"]["connected"] is not True:
                await asyncio.sleep(0.02)
        # the server is gone: the source retries against a closed port
        deadline = time.monotonic() + 5
        while True:
            total = (await scrape(base))["videodb_pipeline_websocket_disconnected_seconds_total"][()]
            if total >= 0.3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert total >= 0.3, total  # it grows while the outage lasts
        source = (await get_json(base, "/api/status"))[1]["source"]
        assert source["connected"] is False and source["reconnects"] == 0
        assert source["gap_seconds"] >= total and source["disconnected_for"] >= total
        assert "websocket disconnected for " in format_status(status_fields(View(rt.b, rt), 0.0))
        await rt.stop()
        assert await run == 0
    assert summary_dict(rt)["gap_seconds"] >= total  # the outage the run stopped in counts too


async def test_a_source_gone_quiet_is_said_next_to_the_lag_of_its_last_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the lag is the last event's, so a connection that stayed open but stopped delivering (a frozen
    server: 40 s until the keep-alive noticed) read `0 ev/s, lag 0.0s, websocket connected` as if keeping up."""
    monkeypatch.setattr(view_module, "QUIET_SHOWN", 0.3)
    port = free_port()
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: quiet
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
runtime: {{http: "127.0.0.1:0", status_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    more = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send('{"connection_id": "c-1"}')
        await ws.send('{"channel": "transcript", "data": {"text": "hi"}}')
        await more.wait()  # connected, silent
        await ws.send('{"channel": "transcript", "data": {"text": "back"}}')
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", port), served(p) as (rt, base):
        run = asyncio.create_task(rt.run())
        try:
            deadline = time.monotonic() + 5
            while (snap := await _status(base)).get("quiet_for") is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert snap.get("quiet_for") is not None and snap["quiet_for"] >= 0.3 and snap["lag"] is not None, snap
            assert snap["source"]["connected"] is True
            assert "no events for " in format_status(status_fields(View(rt.b, rt), 0.0))
            top = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline.cli", "top", base, "--once",
                                                       stdout=subprocess.PIPE, env=ENV)
            out, _ = await communicate(top, 30)
            assert b"no events for " in out, out
            more.set()
            while (snap := await _status(base))["stages"][0]["in"] < 2:
                await asyncio.sleep(0.02)
            assert snap["quiet_for"] is None  # an event came: no longer said
        finally:
            more.set()  # a failed check must not leave the handler, and so the server, waiting
            await rt.stop()
        assert await run == 0


FROZEN_SERVER = """
import asyncio, sys, websockets
async def handler(ws):
    await ws.send('{"connection_id": "c-1"}')
    await ws.send('{"channel": "transcript", "data": {"text": "hi"}}')
    await ws.wait_closed()
async def main():
    async with websockets.serve(handler, "127.0.0.1", int(sys.argv[1])):
        print("up", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


async def test_a_server_that_stops_answering_pings_is_left_after_a_second_not_drain_timeout(tmp_path: Path) -> None:
    """A real server process frozen (SIGSTOP) with the connection open. Before: once the keepalive ping went
    unanswered, closing waited drain_timeout (here 8 s; 30 s by default) for the frozen server's close frame, the
    views said `disconnected` with no outage counted, and the reconnect waited as long."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", FROZEN_SERVER, str(port),
                                                  stdout=subprocess.PIPE, env=ENV)
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: frozen
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", keepalive: 0.3s, backoff_initial: 0.05}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
runtime: {{http: "127.0.0.1:0", status_interval: 0, drain_timeout: 8s}}
dead_letter: {tmp_path}/dead.jsonl
""")
    try:
        assert server.stdout is not None and await asyncio.wait_for(server.stdout.readline(), 10) == b"up\n"
        async with served(p) as (rt, base):
            run = asyncio.create_task(rt.run())
            try:
                while (await _status(base))["stages"][0]["in"] < 1:
                    await asyncio.sleep(0.02)
                server.send_signal(signal.SIGSTOP)
                frozen = time.monotonic()
                while (await _status(base))["source"]["disconnected_for"] is None and time.monotonic() < frozen + 6:
                    await asyncio.sleep(0.05)
                took = time.monotonic() - frozen
                assert took < 4, took  # keepalive (0.3 s to ping, 0.3 s for the pong) + 1 s to close, not + 8 s
            finally:
                server.kill()
                await rt.stop()
            assert await run == 0
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
