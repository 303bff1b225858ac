"""The live views' alert count is what rules made: it says so, so it is not compared with every alert written."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from pipeline.http.view import View
from pipeline.statusline import format_status, status_fields
from tests.operator_harness import config, served


async def test_the_status_line_names_its_alert_count_as_the_rules_alerts(tmp_path: Path) -> None:
    """Before: `alerts 1` in the status line (and `pipeline top`, the page) beside an alerts file of 4 lines: VideoDB's
    own alerts (create_alert) pass through and are written, but only alerts rules made were counted (live, 52
    against 201 lines)."""
    events = tmp_path / "in.jsonl"
    lines = [{"channel": "alert", "rtstream_id": "r", "unix_ts": 1_700_000_000 + i,
              "data": {"event_label": "code_on_screen", "text": f"code {i}"}} for i in range(3)]
    lines.append({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1_700_000_010,
                  "data": {"text": "the password is hunter2"}})
    events.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in lines))
    async with served(config(tmp_path, events)) as (rt, _):
        assert await asyncio.wait_for(rt.run(), 30) == 0
        line = format_status(status_fields(View(rt.b, rt), 0.0))
    written = (tmp_path / "alerts.jsonl").read_bytes().splitlines()
    assert len(written) == 4 and rt.b.chain.alerts_fired == 1
    assert "rule alerts 1" in line, line
