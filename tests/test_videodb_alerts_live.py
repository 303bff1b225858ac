"""VideoDB's own alerts (events the source delivers on the alert channel) are counted in every live view."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson

from pipeline.http.view import View
from pipeline.statusline import format_status, status_fields
from tests.operator_harness import config, get_json, scrape, served
from tests.procs import ROOT, communicate


async def test_videodb_alerts_show_in_the_status_line_api_metrics_and_top(tmp_path: Path) -> None:
    """Before: 130 VideoDB alerts passed through to the alerts file, and the status line, the page, /api/status,
    /metrics and `pipeline top` said only `rule alerts 1`: nothing but `pipeline tap` showed VideoDB raised any.
    Alerts the rules stage makes go out on the same channel and are not counted again."""
    events = tmp_path / "in.jsonl"
    lines = [{"channel": "alert", "rtstream_id": "r", "unix_ts": 1_700_000_000 + i,
              "data": {"event_label": "code_on_screen", "text": f"code {i}"}} for i in range(130)]  # 3 batches
    lines.append({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1_700_000_200,
                  "data": {"text": "the password is hunter2"}})  # a rule alert
    lines.append({"channel": ["alert"], "unix_ts": 1_700_000_201, "data": {}})  # not the alert channel
    lines.append({"event": "capture_session.active", "unix_ts": 1_700_000_202})
    events.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in lines))
    async with served(config(tmp_path, events)) as (rt, base):
        assert await asyncio.wait_for(rt.run(), 30) == 0
        assert rt.b.chain.alerts_fired == 1
        line = format_status(status_fields(View(rt.b, rt), 0.0))
        assert "rule alerts 1, videodb alerts 130" in line, line
        _, snap = await get_json(base, "/api/status")
        assert snap["videodb_alerts"] == 130 and snap["alerts_fired"] == 1
        assert (await scrape(base))["videodb_pipeline_videodb_alerts_total"][()] == 130
        top = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline.cli", "top", base, "--once",
                                                   "--interval", "0.1", stdout=subprocess.PIPE,
                                                   env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        out, _ = await communicate(top, 30)
        assert top.returncode == 0 and b"rule alerts 1  videodb alerts 130" in out, out
    assert len((tmp_path / "alerts.jsonl").read_bytes().splitlines()) == 131  # both kinds written
