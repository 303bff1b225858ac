"""A reload that re-creates a sink whose webhook hangs, then SIGTERM: the stop keeps its bound.

Real parts: the local runtime and reloader, a real webhook server on loopback that never answers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from pipeline.runtime.reload import Reloader
from tests.webhook_server import HANG, WebhookServer

pytestmark = pytest.mark.timeout(40)


def write_config(path: Path, url: str, concurrency: int) -> None:
    path.write_text(f"""
name: reload-hang
source: {{type: "tests.slow_sink:TickSource", every: 0.05}}
runtime: {{drain_timeout: 1s}}
sinks:
  - {{type: jsonl, path: {path.parent}/all.jsonl, flush_interval: 0.1s}}
  - {{type: alert_forwarder, url: "{url}", concurrency: {concurrency}, timeout: 30s, shutdown_timeout: 1s}}
dead_letter: {path.parent}/dead.jsonl
""")


async def test_sigterm_while_a_reload_waits_on_a_hanging_webhook_ends_within_the_bound(tmp_path: Path) -> None:
    """The reload closes the forwarder's old instance: its flush waited for the hanging request (30 s timeout,
    then retries) with ingest paused, and SIGTERM could not end the run meanwhile."""
    server = await WebhookServer(script=[HANG] * 100).start()
    cfg = tmp_path / "p.yaml"
    write_config(cfg, server.url(), 1)
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    rt.reloader = Reloader(rt, cfg, load_config(cfg))
    run = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(10):
            while not server.requests:
                await asyncio.sleep(0.02)
        write_config(cfg, server.url(), 2)  # a changed option: the forwarder is re-created
        reload = asyncio.create_task(rt.reloader.reload("test"))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await rt.stop()  # what SIGTERM does
        try:
            await asyncio.wait_for(asyncio.shield(run), 15)
        except TimeoutError:
            raise AssertionError("the run did not end 15 s after the stop") from None
        took = time.monotonic() - t0
        reload.cancel()
    finally:
        if not run.done():
            run.cancel()
        await server.stop()
    assert took < 1 + 1 + 2 + 1, f"the stop took {took:.1f}s"
    read = rt.b.source.context.stats.received
    written = [orjson.loads(x)["id"] for x in (tmp_path / "all.jsonl").read_bytes().splitlines()]
    assert written == list(range(read))
    dead = {orjson.loads(x)["event"]["id"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()
            if b"alert_forwarder" in x}
    sent = {orjson.loads(r.body)["alert"]["id"] for r in server.requests}
    assert dead | sent == set(range(read)), "accepted alerts neither delivered nor dead-lettered"
