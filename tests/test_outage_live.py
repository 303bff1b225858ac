"""A WebSocket outage as it lasts: every live view counts it, not only once it ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import websockets

from pipeline.http.view import View
from pipeline.statusline import format_status, status_fields
from pipeline.summary import summary_dict
from tests.broker import free_port
from tests.operator_harness import get_json, scrape, served


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
