"""A Kafka source commits a batch once every sink has it safe: for a sink with `buffer: {type: disk}`, once it is
in the spool, whatever the sink's own delivery is waiting for. Real broker, real webhook server, real spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.test_kafka_source import committed, produce
from tests.webhook_server import HANG, WebhookServer

pytestmark = pytest.mark.timeout(60)


async def test_offsets_are_committed_once_spooled_while_a_disk_buffered_forwarder_waits(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: every offset commit first flushed every sink, and the alert forwarder's flush waits for its webhook:
    with the webhook hanging, nothing was committed for as long as it hung, although every batch was in the
    forwarder's spool (a crash then read them all again, and delivered them twice with the spool's copy)."""
    alerts = [orjson.dumps({"channel": "alert", "rtstream_id": "rts-1", "id": i,
                            "data": {"event_label": "x", "text": f"alert {i}", "timestamp": 1710000000000 + i}})
              for i in range(5)]
    await produce(kafka_broker.bootstrap, "spooled-alerts", alerts)
    server = await WebhookServer(script=[HANG] * 100).start()
    rt = None
    try:
        (tmp_path / "p.yaml").write_text(f"""
name: spooled
source: {{type: kafka, bootstrap_servers: "{kafka_broker.bootstrap}", topic: spooled-alerts, group: gs,
          session_timeout: 1s}}
runtime: {{drain_timeout: 0.5s}}
sinks:
  - {{type: alert_forwarder, url: "{server.url()}", timeout: 30s, max_attempts: 5, shutdown_timeout: 0.5s,
      buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
        rt = LocalRuntime(build(load_config(tmp_path / "p.yaml")), install_signals=False)
        task = asyncio.create_task(rt.run())
        got = 0
        async with asyncio.timeout(15):
            while got < 5:  # the commit loop runs every second
                await asyncio.sleep(0.2)
                got = await committed(kafka_broker.bootstrap, "gs", "spooled-alerts")
        assert server.requests and not task.done()  # the webhook holds every request it got
        await rt.stop()
        await asyncio.wait_for(task, 20)
    finally:
        await server.stop()
    dead = [orjson.loads(x)["event"]["id"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert sorted(dead) == list(range(5)), rt.summary()  # the stop: shutdown_timeout, then dead-lettered
