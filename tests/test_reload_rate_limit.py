"""A reload that re-creates an alert forwarder (any option changed) keeps each URL's `rate_limit` bucket.

The new forwarder started with a full bucket: every reload let another `burst` of messages out at once, so a
few saves with --watch during an alert storm sent many times what the rate allowed (Slack then refuses). It also
forgot the idempotency keys already sent, which the README says are never forwarded twice in a run.

Real parts: the local runtime and reloader, a config file read again, a real webhook server on loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from pipeline.runtime.reload import Reloader
from tests.test_reload_window import SOURCE
from tests.webhook_server import WebhookServer

pytestmark = pytest.mark.timeout(30)


def write_config(path: Path, url: str, timeout: str) -> None:
    path.write_text(f"""
name: limited
source: {{type: "fed_src:Fed"}}
runtime: {{drain_timeout: 1s}}
sinks:
  - {{type: alert_forwarder, url: "{url}", rate_limit: 2/min, timeout: {timeout}, shutdown_timeout: 1s}}
dead_letter: {path.parent}/dead.jsonl
""")


def alert(i: int) -> dict[str, object]:
    return {"channel": "alert", "id": i, "rtstream_id": "rts-1",
            "data": {"event_label": f"label-{i}", "timestamp": 1710000000000 + i, "text": f"alert {i}"}}


async def test_a_reloaded_forwarder_does_not_get_a_fresh_burst(tmp_path: Path) -> None:
    (tmp_path / "fed_src.py").write_text(SOURCE)
    server = await WebhookServer().start()
    cfg = tmp_path / "p.yaml"
    write_config(cfg, server.url(), "5s")
    config = load_config(cfg)
    fed: object = config.source.cls
    fed.QUEUE = asyncio.Queue()  # type: ignore[attr-defined]
    rt = LocalRuntime(build(config), install_signals=False)
    rt.reloader = Reloader(rt, cfg, config)
    run = asyncio.create_task(rt.run())
    try:
        fed.QUEUE.put_nowait([alert(0), alert(1)])  # type: ignore[attr-defined]
        async with asyncio.timeout(10):  # the burst (2) goes out at once; the bucket is empty now
            while len(server.requests) < 2:
                await asyncio.sleep(0.02)
        for n, timeout in enumerate(("6s", "7s", "8s"), 2):  # three saves, each re-creates the forwarder
            write_config(cfg, server.url(), timeout)
            assert await rt.reloader.reload("test")
            fed.QUEUE.put_nowait([alert(n), alert(0)])  # type: ignore[attr-defined]  (0: sent already)
        await asyncio.sleep(0.5)
        sent = len(server.requests)
        fed.QUEUE.put_nowait(None)  # the run ends: what the rate still holds back is dead-lettered, not lost
        await asyncio.wait_for(run, 15)
    finally:
        if not run.done():
            run.cancel()
        await server.stop()
    assert sent == 2, f"{sent} messages within a second at 2/min"
    delivered = {orjson.loads(r.body)["alert"]["id"] for r in server.requests}
    dead = {orjson.loads(x)["event"]["id"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()}
    assert delivered == {0, 1} and dead == {2, 3, 4}, (delivered, dead)  # alert 0 again: a duplicate, dropped
