"""/metrics, /healthz and /ready of a real running pipeline, scraped over HTTP and parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
import websockets

from pipeline.summary import summary_dict
from tests.broker import free_port
from tests.operator_harness import config, get_json, replay_file, scrape, served


def _one(metrics: dict, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    for key, value in metrics[name].items():
        if all(item in key for item in want):
            return value
    raise AssertionError(f"{name}{labels} not in {metrics[name]}")


async def test_metrics_during_and_after_a_run_agree_with_the_summary(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 3000, step=0.001, garbage=3)  # ~3 s of event time
    async with served(config(tmp_path, events, speed=1)) as (rt, base):
        run = asyncio.create_task(rt.run())
        src_during = 0.0
        deadline = asyncio.get_running_loop().time() + 2.0  # (a fixed 0.5 s could come before the first batch)
        while src_during == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            during = await scrape(base)
            src_during = _one(during, "videodb_pipeline_stage_events_in_total", stage="source:replay")
        assert 0 < src_during < 3000, "scraped while the replay was running"
        assert await run == 0
        after = await scrape(base)
    summary = summary_dict(rt)
    source = next(s for s in summary["stages"] if s["kind"] == "source")
    assert _one(after, "videodb_pipeline_stage_events_in_total", stage="source:replay") == source["read"] == 3000
    assert _one(after, "videodb_pipeline_stage_events_dropped_total", stage="source:replay") == source["rejected"] == 3
    for st in summary["stages"][1:]:
        assert _one(after, "videodb_pipeline_stage_events_in_total", stage=st["name"]) == st["in"]
        assert _one(after, "videodb_pipeline_stage_events_out_total", stage=st["name"]) == st["out"]
        assert _one(after, "videodb_pipeline_stage_events_dropped_total", stage=st["name"]) == st["dropped"]
    for sk in summary["sinks"]:
        assert _one(after, "videodb_pipeline_sink_events_written_total", sink=sk["name"]) == sk["written"]
        assert _one(after, "videodb_pipeline_sink_errors_total", sink=sk["name"]) == sk["failed"]
        # receipt -> written latency: one observation per event written
        assert _one(after, "videodb_pipeline_sink_latency_seconds_count", sink=sk["name"]) == sk["written"]
        assert _one(after, "videodb_pipeline_sink_queue_events", sink=sk["name"]) == 0
    fired = after["videodb_pipeline_alerts_fired_total"]
    assert sum(fired.values()) == summary["alerts_fired"] == 63
    assert _one(after, "videodb_pipeline_alerts_fired_total", rule="secret", severity="critical") == 60
    assert sum(after["videodb_pipeline_dead_letters_total"].values()) == summary["dead_lettered"] == 3
    assert _one(after, "videodb_pipeline_dead_letters_total", reason="not JSON") == 3
    assert _one(after, "videodb_pipeline_event_lag_seconds_count") == 3000
    assert "process_cpu_seconds_total" in after
    for name, series in after.items():  # never a session or stream id, never event text, in a label
        for labels in series:
            assert not any("rts-" in v or "password" in v for _, v in labels), (name, labels)


async def test_two_pipelines_in_one_process_have_separate_registries(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ea = replay_file(tmp_path / "a/in.jsonl", 100)
    eb = replay_file(tmp_path / "b/in.jsonl", 40)
    async with served(config(tmp_path / "a", ea, name="a")) as (ra, ua), \
            served(config(tmp_path / "b", eb, name="b")) as (rb, ub):
        assert await ra.run() == 0 and await rb.run() == 0
        ma, mb = await scrape(ua), await scrape(ub)
    assert _one(ma, "videodb_pipeline_stage_events_in_total", stage="source:replay") == 100
    assert _one(mb, "videodb_pipeline_stage_events_in_total", stage="source:replay") == 40


async def test_ready_is_503_until_the_websocket_source_connects(tmp_path: Path) -> None:
    port = free_port()
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: ws
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.05, backoff_max: 0.1}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
runtime: {{http: "127.0.0.1:0", status_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    sent = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send('{"connection_id": "c-1"}')
        await ws.send('{"channel": "transcript", "data": {"text": "hi"}}')
        sent.set()
        await ws.wait_closed()  # as a server does: the client's close ends the connection

    async with served(p) as (rt, base):
        status, body = await get_json(base, "/ready")
        assert status == 503 and "sinks" in body["not_ready"]  # before the run starts
        run = asyncio.create_task(rt.run())
        await asyncio.sleep(0.4)  # the source is retrying against a closed port
        status, body = await get_json(base, "/ready")
        assert status == 503, body
        assert body["not_ready"] == {"source": "not connected"}
        assert (await scrape(base))["videodb_pipeline_websocket_connected"][()] == 0
        async with websockets.serve(handler, "127.0.0.1", port):
            await asyncio.wait_for(sent.wait(), 5)
            for _ in range(50):
                status, body = await get_json(base, "/ready")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert (status, body) == (200, {"ready": True})
            assert (await scrape(base))["videodb_pipeline_websocket_connected"][()] == 1
            status, body = await get_json(base, "/healthz")
            assert status == 200 and body["status"] == "ok"
            await rt.stop()
            assert await run == 0


async def test_healthz_reports_a_blocked_loop(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events)) as (rt, base):
        view_server = rt.http_server
        view_server.view.heartbeat -= 10  # as if the loop had not run the heartbeat for 10 s
        status, body = await get_json(base, "/healthz")
        assert status == 503 and body["reason"] == "the event loop is blocked"
        await asyncio.sleep(0.7)  # the heartbeat runs again
        status, _ = await get_json(base, "/healthz")
        assert status == 200


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "nonsense", "[::1]9464"])
async def test_bad_http_address_is_one_config_error(tmp_path: Path, address: str) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    events = replay_file(tmp_path / "in.jsonl", 1)
    p = config(tmp_path, events)
    p.write_text(p.read_text().replace('"127.0.0.1:0"', f'"{address}"'))
    with pytest.raises(ConfigError, match=r"runtime\.http: expected HOST:PORT"):
        load_config(p)


def test_a_port_alone_listens_on_loopback(tmp_path: Path) -> None:
    """`http: 9464` is a number in YAML; it used to fail with "expected a string, got 9464"."""
    from pipeline.config import load_config
    from pipeline.http.address import parse_address

    p = config(tmp_path, replay_file(tmp_path / "in.jsonl", 1))
    p.write_text(p.read_text().replace('http: "127.0.0.1:0"', "http: 9464"))
    http = load_config(p).runtime.http
    assert http is not None and parse_address(http) == ("127.0.0.1", 9464)
    # and editors using `pipeline schema` accept it too
    import jsonschema
    import yaml

    from pipeline.cli import _all_stage_classes
    from pipeline.schema import json_schema

    validator = jsonschema.Draft202012Validator(json_schema(_all_stage_classes()))
    assert not list(validator.iter_errors(yaml.safe_load(p.read_text())))


async def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        events = replay_file(tmp_path / "in.jsonl", 1)
        p = config(tmp_path, events)
        p.write_text(p.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1"):
            async with served(p):
                pass


async def test_metrics_stay_open_with_a_token(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events, extra_runtime=", http_token: s3cret-token")) as (rt, base):
        await rt.run()
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/healthz", "/ready"):
                async with http.get(base + path) as r:
                    assert r.status in (200, 503), path


async def test_ready_waits_for_an_active_capture_session(tmp_path: Path) -> None:
    """With a controller, /ready stays 503 until the session is active, and says so."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.http.view import View

    cfg = load_config(Path(__file__).resolve().parents[1] / "config/demo.yaml")
    built = build(cfg)

    class _Rt:
        sinks_started = True
        source_running = True

    view = View(built, _Rt())
    built.source.connected = True  # as once the WebSocket is open
    assert view.ready() == {"capture_session": "state is unknown (not created yet), not active"}
    built.controller.lifecycle.advance("starting")
    assert view.ready() == {"capture_session": "state is starting, not active"}
    built.controller.lifecycle.advance("active")
    assert view.ready() == {}
    built.controller.lifecycle.advance("stopping")
    assert "capture_session" in view.ready()


async def test_reconnect_and_backfill_counters_agree_with_the_summary(tmp_path: Path) -> None:
    """The WebSocket families, from a real videodb source whose connection the emulator keeps dropping."""
    import yaml

    from pipeline.emulator import Emulator
    from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE

    emu = Emulator(speed=0, api_key=API_KEY, drop_after=7)
    await emu.start()
    try:
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({
            "name": "drops", "videodb": {"api_key": API_KEY, "base_url": emu.base_url}, "source": {"type": "videodb"},
            "controller": {"type": "capture_session", "end_user_id": "u", "state_dir": str(tmp_path / "state"),
                           "on_active": FULL_ON_ACTIVE, "status_poll_interval": "1s"},
            "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
            "runtime": {"http": "127.0.0.1:0", "status_interval": 0}, "dead_letter": str(tmp_path / "dead.jsonl")}))
        async with served(p) as (rt, base):
            assert await asyncio.wait_for(rt.run(), 60) == 0
            after = await scrape(base)
    finally:
        await emu.stop()
    summary = summary_dict(rt)
    assert summary["reconnects"] >= 1 and emu.hub.drops >= 1
    assert after["videodb_pipeline_websocket_reconnects_total"][()] == summary["reconnects"]
    assert summary["gap_seconds"] > 0  # the summary rounds to ms
    assert after["videodb_pipeline_websocket_disconnected_seconds_total"][()] == pytest.approx(
        summary["gap_seconds"], abs=0.0006)
    backfilled = {dict(k)["channel"]: v for k, v in after["videodb_pipeline_events_backfilled_total"].items()}
    assert backfilled == summary["backfilled"] and sum(backfilled.values()) > 0
    assert after["videodb_pipeline_capture_session_state"][(("state", "exported"),)] == 1


SLOW = "sinks[0]:tests.slow_sink:SlowSink"


async def test_spooled_backlog_shows_in_queue_and_spool_metrics(tmp_path: Path) -> None:
    """A slow sink with a disk buffer: its backlog is on disk; /metrics says how much, during and after."""
    events = replay_file(tmp_path / "in.jsonl", 2000)
    counts = tmp_path / "counts.txt"
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: spool
source: {{type: replay, path: {events}, batch_size: 100}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {counts}, delay: 0.1, buffer: {{type: disk}}}}
runtime: {{http: "127.0.0.1:0", status_interval: 0, drain_timeout: 0.5s}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    async with served(p) as (rt, base):
        run = asyncio.create_task(rt.run())
        spooled = 0.0
        for _ in range(100):
            await asyncio.sleep(0.02)
            during = await scrape(base)
            spooled = _one(during, "videodb_pipeline_sink_spool_bytes", sink=SLOW)
            if spooled > 0:
                break
        assert spooled > 0, "a backlog of a slow sink with a disk buffer is spooled"
        assert _one(during, "videodb_pipeline_sink_queue_events", sink=SLOW) > 0
        assert await run == 0
        after = await scrape(base)
    written = sum(int(x) for x in counts.read_text().split())
    assert 0 < written < 2000
    assert _one(after, "videodb_pipeline_sink_events_written_total", sink=SLOW) == written
    assert _one(after, "videodb_pipeline_sink_queue_events", sink=SLOW) == 2000 - written
    assert _one(after, "videodb_pipeline_sink_spool_bytes", sink=SLOW) > 0
    assert f"left spooled {2000 - written}" in rt.summary()


async def test_ready_with_the_session_api_waits_for_the_api_not_for_one_session(tmp_path: Path) -> None:
    """With `controller.api` the pipeline has no session of its own: /ready is 200 once the source is connected
    and the session API listens (before: 503 'capture_session: state is unknown' for ever, even with active
    sessions, so a readiness probe never let traffic reach the API), and the status line, page and
    `pipeline top` show how many of its sessions are live (before: 'session none')."""
    import yaml

    from pipeline.emulator import Emulator
    from pipeline.statusline import format_status, status_fields
    from tests.videodb_harness import API_KEY, scenario_file

    emu = Emulator(scenario_file(tmp_path, [], end=1000), api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({
            "name": "backend", "videodb": {"api_key": API_KEY, "base_url": emu.base_url},
            "source": {"type": "videodb"},
            "controller": {"type": "capture_session", "state_dir": str(tmp_path / "state"),
                           "api": {"listen": "127.0.0.1:0", "token": "session-api-token-0123456789"}},
            "sinks": [{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
            "runtime": {"http": "127.0.0.1:0", "status_interval": 0},
            "dead_letter": str(tmp_path / "dead.jsonl")}))
        async with served(p) as (rt, base):
            run = asyncio.create_task(rt.run())
            try:
                async with asyncio.timeout(10):
                    while await get_json(base, "/ready") != (200, {"ready": True}):
                        await asyncio.sleep(0.05)
                api = rt.b.controller.api.url  # the API it waited for
                async with aiohttp.ClientSession() as http, http.post(
                        api + "/v1/sessions", json={"end_user_id": "u"},
                        headers={"Authorization": "Bearer session-api-token-0123456789"}) as r:
                    assert r.status == 201, await r.text()
                status, snap = await get_json(base, "/api/status")
                assert status == 200 and snap["session"] is None and snap["sessions"] == {"live": 1, "held": 1}
                line = format_status(status_fields(rt.http_server.view, 0.0))
                assert "sessions 1 live" in line and "session none" not in line, line
            finally:
                await rt.stop()
                assert await run == 0
    finally:
        await emu.stop()


async def test_a_client_hammering_metrics_gets_429_not_the_pipelines_time(tmp_path: Path) -> None:
    """/metrics is open to anyone who reaches the port, and a scrape costs the event loop most of a millisecond:
    clients asking back to back took it from the pipeline (8 of them made a 300,000-event replay 12 times
    slower). Scrapes may take a bounded share of the pipeline's time; beyond it they are answered 429."""
    async with served(config(tmp_path, replay_file(tmp_path / "in.jsonl", 10))) as (_rt, base):
        statuses: list[int] = []
        retry: set[str | None] = set()
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # back to back: well over the share of a second or two
                async with http.get(base + "/metrics") as r:
                    await r.read()
                    statuses.append(r.status)
                    if r.status == 429:
                        retry.add(r.headers.get("Retry-After"))
            assert statuses[0] == 200 and 0 < statuses.count(200) < statuses.count(429), statuses.count(200)
            assert set(statuses) == {200, 429} and retry == {"1"}
            for _ in range(100):  # the share refills as time passes: a scrape is answered again
                await asyncio.sleep(0.05)
                async with http.get(base + "/metrics") as r:
                    if r.status == 200:
                        break
            assert r.status == 200
