"""A source that never ends after stop() (a plugin waiting on a call that never returns) cannot hold up a stop:
after drain_timeout it is cancelled, and what it had yielded is written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime

pytestmark = pytest.mark.timeout(30)


async def test_a_source_that_ignores_stop_is_cancelled_after_drain_timeout(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: stuck
source: {{type: "tests.slow_sink:StuckSource"}}
runtime: {{drain_timeout: 0.5s}}
stages:
  - {{type: window, size: 60s}}
sinks:
  - {{type: jsonl, path: {tmp_path}/out.jsonl}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    async with asyncio.timeout(5):
        while rt.b.source.context.stats.received < 1:
            await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await rt.stop()  # what SIGTERM does
    code = await asyncio.wait_for(asyncio.shield(run), 5)  # it waited for the source forever
    assert time.monotonic() - t0 < 0.5 + 1
    assert code == 0
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"window"' in lines[1]  # the event, and its open window closed as at any stop
