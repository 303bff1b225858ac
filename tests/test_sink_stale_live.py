"""A sink's latency in the live views says how old it is, and a batch stuck in a sink says so while it lasts."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline.http.view as view_module
from pipeline.http.view import View
from pipeline.statusline import format_status, status_fields
from tests.operator_harness import get_json, served
from tests.procs import ROOT, communicate

GATED = "sinks[0]:tests.slow_sink:GatedSink"


async def _sink(base: str, key: str, deadline: float = 5.0) -> dict[str, Any]:
    """The gated sink's entry of /api/status once `key` is set in it (or the last one after `deadline` s)."""
    end = time.monotonic() + deadline
    while True:
        sink: dict[str, Any] = (await get_json(base, "/api/status"))[1]["sinks"][0]
        if sink.get(key) is not None or time.monotonic() > end:
            return sink
        await asyncio.sleep(0.05)


async def _top(base: str) -> str:
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.cli", "top", base, "--once", "--interval", "0.1", stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "220"})
    out, _ = await communicate(top, 30)
    assert top.returncode == 0, out
    return out.decode()


async def test_a_stuck_sink_and_an_old_latency_are_said_in_every_view(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the views showed a sink's `latency` of its last batch as if current: a sink stuck on one batch
    (a webhook that never answers) showed the latency of the batch before, or `-`, and nothing else; one that had
    written nothing for an hour still showed its last latency. Now a batch in the sink for a while says `writing Ns`
    (status line: `... writing one batch for Ns`), and an old latency says how old (`12.0ms, 300s ago`)."""
    monkeypatch.setattr(view_module, "SINK_STALE_SHOWN", 0.3, raising=False)  # (not raising: runs on older code)
    events = tmp_path / "in.jsonl"
    events.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "unix_ts": 1_700_000_000 + i,
                                              "data": {"text": f"line {i}"}}) + b"\n" for i in range(10)))
    hold = tmp_path / "gated.hold"
    hold.write_text("")
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: stale
source: {{type: replay, path: {events}}}
sinks:
  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/gated, delay: 0}}
  - {{type: jsonl, path: {tmp_path}/out.jsonl}}
runtime: {{http: "127.0.0.1:0", status_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    async with served(p) as (rt, base):
        run = asyncio.create_task(rt.run())
        try:
            sink = await _sink(base, "writing_for")
            assert sink["writing_for"] is not None and sink["writing_for"] >= 0.3, sink
            assert sink["latency"] is None and sink["written"] == 0
            line = format_status(status_fields(View(rt.b, rt), 0.0))
            assert f"{GATED} writing one batch for " in line, line
            table = await _top(base)
            assert re.search(r"GatedSink .* writing \d+s ", table), table
        finally:
            hold.unlink()
        assert await asyncio.wait_for(run, 30) == 0
        sink = await _sink(base, "latency_age")
        assert sink["writing_for"] is None and sink["written"] == 10 and sink["latency"] is not None, sink
        assert sink["latency_age"] >= 0.3, sink
        table = await _top(base)
        assert re.search(r"GatedSink .* \S+, \d+s ago ", table), table
        assert "writing one batch" not in format_status(status_fields(View(rt.b, rt), 0.0))
