"""Counters across a config reload: what /metrics, /api/status and the exit summary say a re-created sink
wrote and a re-created rules stage fired is the whole run's, as the output shows it (a real `pipeline run`,
a WebSocket server we feed, SIGHUP, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
import websockets

from tests.broker import free_port
from tests.operator_harness import get_json, scrape
from tests.procs import communicate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

CONFIG = """name: counted
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
stages:
  - type: rules
    rules:
      - {{name: secret, keywords: [password], severity: critical}}
{extra_rule}
sinks:
  - {{type: console, max_text: {max_text}}}
  - {{type: jsonl, path: {tmp}/out.jsonl, flush_interval: 0}}
runtime: {{status_interval: 0}}
dead_letter: {tmp}/dead.jsonl
"""


@pytest.fixture
async def feed() -> AsyncIterator[tuple[int, asyncio.Queue[str]]]:
    """A WebSocket server sending what the test puts in the queue; yields (port, queue)."""
    frames: asyncio.Queue[str] = asyncio.Queue()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send('{"connection_id": "conn-1"}')
        closed = asyncio.ensure_future(ws.wait_closed())
        while True:
            get = asyncio.ensure_future(frames.get())
            await asyncio.wait([get, closed], return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                get.cancel()
                return
            await ws.send(get.result())

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        yield server.sockets[0].getsockname()[1], frames


async def until(cond: Callable[[], bool], what: str, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def send(frames: asyncio.Queue[str], first: int) -> None:
    """Ten transcripts (`first`...`first + 9`), each an alert of the `secret` rule."""
    for i in range(first, first + 10):
        frames.put_nowait(orjson.dumps({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1.7e9 + i,
                                        "data": {"text": f"the password is {i}"}}).decode())


async def start(tmp_path: Path, port: int, *args: str) -> tuple[asyncio.subprocess.Process, str, Path, Path]:
    """`pipeline run p.yaml` (CONFIG, fed from `port`) with its operator endpoint: (process, its URL, stdout and
    stderr files)."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(CONFIG.format(port=port, tmp=tmp_path, max_text=160, extra_rule=""))
    base = f"http://127.0.0.1:{free_port()}"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--http", base.removeprefix("http://"), *args,
            stdout=o, stderr=e, env=ENV, cwd=tmp_path)
    return proc, base, out, err


async def test_a_reload_that_re_creates_a_sink_and_the_rules_keeps_their_counts(
        tmp_path: Path, feed: tuple[int, asyncio.Queue[str]]) -> None:
    port, frames = feed
    cfg = tmp_path / "p.yaml"
    proc, base, out, err = await start(tmp_path, port, "--summary-json", str(tmp_path / "summary.json"))
    try:
        jsonl = tmp_path / "out.jsonl"
        send(frames, 0)  # 10 transcripts, 10 alerts of `secret`
        await until(lambda: count_lines(jsonl) == 20, "the first events")
        # the console sink's options change (it is re-created) and the rules stage gets a rule (re-created too)
        cfg.write_text(CONFIG.format(port=port, tmp=tmp_path, max_text=100,
                                     extra_rule="      - {name: also, keywords: [is]}"))
        proc.send_signal(signal.SIGHUP)
        await until(lambda: "reload (SIGHUP) applied" in err.read_text(), "the reload")
        assert "sinks re-created: sinks[0]\n" in err.read_text()
        status, snap = await get_json(base, "/api/status")
        assert status == 200 and len(snap["alerts"]) == 10  # the status page's last alerts are still there
        send(frames, 10)  # 10 transcripts, 10 alerts of `secret`, 10 of `also`
        await until(lambda: count_lines(jsonl) == 50, "the events after the reload")

        m = await scrape(base)
        written = m["videodb_pipeline_sink_events_written_total"]
        assert written[(("sink", "sinks[0]:console"),)] == 50, written
        fired = m["videodb_pipeline_alerts_fired_total"]
        rule = (("rule", "secret"), ("severity", "critical"), ("stage", "stages[0]:rules"))
        assert fired[rule] == 20, fired
        assert sum(fired.values()) == 30, fired
        status, snap = await get_json(base, "/api/status")
        assert status == 200
        console = next(s for s in snap["sinks"] if s["name"] == "sinks[0]:console")
        assert console["written"] == 50, console
        # the rules stage removed: the alerts it fired still count; the console re-created a second time: what
        # both of its predecessors printed still counts (the second one's count replaced the first's)
        cfg.write_text(CONFIG.format(port=port, tmp=tmp_path, max_text=120, extra_rule="").replace(
            "  - type: rules\n    rules:\n      - {name: secret, keywords: [password], severity: critical}\n",
            "  - {type: filter, channels: [transcript]}\n"))
        proc.send_signal(signal.SIGHUP)
        await until(lambda: err.read_text().count("reload (SIGHUP) applied") == 2, "the second reload")
        status, snap = await get_json(base, "/api/status")
        assert snap["alerts_fired"] == 30, snap["alerts_fired"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await communicate(proc, 20)
    assert proc.returncode == 0, err.read_text()
    printed = [ln for ln in out.read_text().splitlines() if ln.startswith("[")]
    assert len(printed) == 50
    summary = json.loads((tmp_path / "summary.json").read_text())
    sinks = {s["name"]: s for s in summary["sinks"]}
    assert sinks["sinks[0]:console"]["written"] == 50, sinks
    assert summary["alerts_fired"] == 30
    text = err.read_text()
    assert "sinks[0]:console             written     50" in text, text
    assert "alerts fired by rules: 30" in text


async def test_a_rules_stage_moved_by_a_reload_keeps_its_counts_and_last_alerts(
        tmp_path: Path, feed: tuple[int, asyncio.Queue[str]]) -> None:
    """A filter added in front of the rules stage moves it from stages[0] to stages[1]: the status page's last
    alerts were emptied, and its in/out counts and alerts per rule (/metrics) started again from 0 (10 alerts
    fired, 1 counted after the next event). The moved stage now goes on counting where it was."""
    port, frames = feed
    cfg = tmp_path / "p.yaml"
    proc, base, _, err = await start(tmp_path, port)
    try:
        jsonl = tmp_path / "out.jsonl"
        send(frames, 0)
        await until(lambda: count_lines(jsonl) == 20, "the first events")
        cfg.write_text(CONFIG.format(port=port, tmp=tmp_path, max_text=160, extra_rule="").replace(
            "  - type: rules\n", "  - {type: filter, channels: [transcript]}\n  - type: rules\n"))
        proc.send_signal(signal.SIGHUP)
        await until(lambda: "reload (SIGHUP) applied: 2 processor(s)" in err.read_text(), "the reload")
        status, snap = await get_json(base, "/api/status")
        assert status == 200 and len(snap["alerts"]) == 10, snap["alerts"]  # the last alerts are still there
        send(frames, 10)
        await until(lambda: count_lines(jsonl) == 40, "the events after the reload")
        fired = (await scrape(base))["videodb_pipeline_alerts_fired_total"]
        assert fired == {(("rule", "secret"), ("severity", "critical"), ("stage", "stages[1]:rules")): 20}, fired
        status, snap = await get_json(base, "/api/status")
        rules = next(s for s in snap["stages"] if s["name"] == "stages[1]:rules")
        assert (rules["in"], rules["out"], snap["alerts_fired"]) == (20, 40, 20), (rules, snap["alerts_fired"])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await communicate(proc, 20)
    assert proc.returncode == 0, err.read_text()
    summary = next(ln.split() for ln in err.read_text().splitlines() if ln.startswith("  stages[1]:rules"))
    assert summary[1:5] == ["in", "20", "out", "40"], summary
