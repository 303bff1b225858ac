"""The status page as a person sees it, in real headless Chromium, while a replay runs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import pipeline.http.view as view_module
from tests.browser import browser_page
from tests.operator_harness import config, replay_file, served


@contextmanager
def pipeline_in_thread(path: Path, *, to_the_end: bool) -> Iterator[str]:
    """Run the pipeline of `path` with its operator endpoint in a thread (the browser is driven from this
    one); yields the endpoint's URL. `to_the_end`: serve once the run is over, else while it runs."""
    ready, done = threading.Event(), threading.Event()
    box: dict[str, str] = {}

    async def pipeline() -> None:
        async with served(path) as (rt, base):
            run = asyncio.create_task(rt.run())
            if to_the_end:
                await run
            box["base"] = base
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 60)
            await rt.stop()
            await run

    thread = threading.Thread(target=lambda: asyncio.run(pipeline()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield box["base"]
    finally:
        done.set()
        thread.join(30)


def status_alerts(base: str) -> list[tuple[str, str]]:
    """(rule, text) of the alerts the status API lists now, for a failure message."""
    with urllib.request.urlopen(base + "/api/status", timeout=5) as r:
        return [(a["data"]["event_label"], a["data"]["text"]) for a in json.loads(r.read())["alerts"]]


def test_status_page_shows_stages_counters_alerts_and_events(tmp_path: Path) -> None:
    # 40 events/s for up to a minute (the test stops it sooner), an alert every 2.5 s
    events = replay_file(tmp_path / "in.jsonl", 2400, step=0.025, alert_every=100)
    with pipeline_in_thread(config(tmp_path, events, speed=1), to_the_end=False) as base, browser_page() as page:
        page.goto(base + "/")
        page.wait_for_selector(".node[data-stage='stages[1]:rules']", timeout=10_000)
        for name in ("source:replay", "stages[0]:filter", "stages[1]:rules", "sinks[0]:jsonl", "sinks[1]:jsonl"):
            assert page.locator(f".node[data-stage='{name}']").is_visible(), name
        # counters move while events flow, an alert row appears, the live tail shows events
        page.wait_for_function("document.querySelectorAll('#alerts tbody tr.alert-row').length > 0",
                               timeout=10_000)
        page.wait_for_function("document.querySelectorAll('#events li').length >= 5", timeout=10_000)
        page.wait_for_timeout(1200)  # two polls: rates need a previous sample
        rates = page.locator(".node[data-stage='source:replay'] .rate").text_content() or ""
        assert rates != "0.0/s", rates
        counts = page.locator(".node[data-stage='stages[1]:rules'] .counts").text_content() or ""
        assert counts.startswith("in ") and not counts.startswith("in 0 "), counts
        # the `code` rule fires once per stream (1 h cooldown) and fills the newest rows at first: wait for a
        # `secret` row (one fires on the first event, the next 2.5 s later) and read it in the same evaluation
        find_secret = """() => {
                for (const row of document.querySelectorAll('#alerts tbody tr.alert-row')) {
                    const cells = [...row.querySelectorAll('td')].map((td) => td.textContent);
                    if (cells[2] === 'secret') return cells;
                }
                return null;
            }"""
        try:
            cells = page.wait_for_function(find_secret, timeout=15_000).json_value()
        except Exception:
            rows = page.evaluate("() => [...document.querySelectorAll('#alerts tbody tr.alert-row')]"
                                 ".map((r) => [...r.querySelectorAll('td')].map((td) => td.textContent))")
            raise AssertionError(f"no secret alert row: page rows {rows}; /api/status alerts "
                                 f"{status_alerts(base)}") from None
        assert cells[1] == "critical" and (cells[4] or "").startswith("password"), cells
        assert re.fullmatch(r"2023-11-14 22:1\d:\d\d", cells[0] or ""), cells[0]  # an alert's event time
        assert page.locator("#ready").text_content() == "ready"
        assert "following stages[1]:rules" in (page.locator("#tap-state").text_content() or "")
        shot = tmp_path / "status.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("PIPELINE_TEST_SCREENSHOTS")
        if keep:
            shutil.copy(shot, Path(keep) / "status-page.png")


def test_event_text_is_never_html(tmp_path: Path) -> None:
    """Meeting text goes into the page as text: a <script> or <img onerror> in it does not run."""
    events = tmp_path / "in.jsonl"
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> password'
    line = json.dumps({"channel": "visual_index", "unix_ts": 1700000000.0, "data": {"text": evil, "start": 1}})
    events.write_text((line + "\n") * 3)
    with pipeline_in_thread(config(tmp_path, events), to_the_end=True) as base, browser_page() as page:
        page.goto(base + "/")
        page.wait_for_selector("#alerts tbody tr.alert-row", timeout=10_000)
        assert evil in (page.locator("#alerts tbody tr.alert-row td").nth(4).text_content() or "")
        assert page.evaluate("window.pwned") is None


def test_status_page_counts_videodb_alerts_beside_rule_alerts(tmp_path: Path) -> None:
    """Before: the totals said `rule alerts 1` only: VideoDB's own alerts (3 here) showed nowhere on the page."""
    events = tmp_path / "in.jsonl"
    lines = [{"channel": "alert", "unix_ts": 1700000000.0 + i, "data": {"text": f"alert {i}"}} for i in range(3)]
    lines.append({"channel": "transcript", "unix_ts": 1700000009.0, "data": {"text": "password", "start": 1}})
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    with pipeline_in_thread(config(tmp_path, events), to_the_end=True) as base, browser_page() as page:
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('totals').textContent.includes('videodb alerts 3')",
                               timeout=10_000)
        assert (page.locator("#totals").text_content() or "").startswith("rule alerts 1 · videodb alerts 3")


def test_status_page_says_a_batch_is_stuck_in_a_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the latency cell of a sink stuck on its first batch said nothing (a dash), as for an idle sink."""
    monkeypatch.setattr(view_module, "SINK_STALE_SHOWN", 0.3, raising=False)  # (not raising: runs on older code)
    events = replay_file(tmp_path / "in.jsonl", 10)
    hold = tmp_path / "gated.hold"
    hold.write_text("")
    gated = f'  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/gated, delay: 0}}'
    with pipeline_in_thread(config(tmp_path, events, sinks=gated), to_the_end=False) as base, browser_page() as page:
        try:  # (the hold goes before the pipeline stops, else the stop waits drain_timeout)
            page.goto(base + "/")
            cell = page.wait_for_function("""() => {
                    for (const row of document.querySelectorAll('#sinks tbody tr')) {
                        const cells = [...row.querySelectorAll('td')].map((td) => td.textContent);
                        if (cells[0].endsWith('GatedSink') && cells[4].startsWith('writing ')) return cells[4];
                    }
                    return null;
                }""", timeout=10_000).json_value()
            assert re.fullmatch(r"writing \d+(\.\d)? (ms|s)", cell), cell
        finally:
            hold.unlink()


def test_status_page_shows_websocket_and_capture_session_state(tmp_path: Path) -> None:
    """A live videodb source and controller (the emulator in its own process): the page says both are up."""
    import signal
    import subprocess
    import sys

    import yaml

    from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE

    root = Path(__file__).resolve().parents[1]
    emu = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "emulate", "--speed", "1", "--api-key", API_KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert emu.stdout is not None
        url = emu.stdout.readline().strip().partition("=")[2]
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({
            "name": "live", "videodb": {"api_key": API_KEY, "base_url": url}, "source": {"type": "videodb"},
            "controller": {"type": "capture_session", "end_user_id": "u", "state_dir": str(tmp_path / "state"),
                           "on_active": FULL_ON_ACTIVE},
            "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
            "runtime": {"http": "127.0.0.1:0", "status_interval": 0}, "dead_letter": str(tmp_path / "dead.jsonl")}))
        with pipeline_in_thread(p, to_the_end=False) as base, browser_page() as page:
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('session').textContent === 'session active'",
                                   timeout=15_000)
            assert page.locator("#ws").is_visible() and page.locator("#ws").text_content() == "WebSocket connected"
            assert page.locator("#ready").text_content() == "ready"
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait(10)


def test_events_with_odd_stamps_do_not_break_the_page(tmp_path: Path) -> None:
    """`ts` and `unix_ts` come with the event and reach the page in its alerts: a number as `ts`, or a
    `unix_ts` past what a JavaScript Date can show, must not stop the page from rendering."""
    events = tmp_path / "in.jsonl"
    lines = [{"channel": "visual_index", "unix_ts": 1700000000.0, "data": {"text": "password one", "start": 1}},
             {"channel": "visual_index", "ts": 5, "unix_ts": 1700000001.0, "data": {"text": "password two"}},
             {"channel": "visual_index", "ts": {"a": 1}, "unix_ts": 1700000002.0, "data": {"text": "password 3"}},
             {"channel": "visual_index", "unix_ts": 1e300, "data": {"text": "password four", "start": 2}}]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    with pipeline_in_thread(config(tmp_path, events), to_the_end=True) as base, browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        page.wait_for_function("document.querySelectorAll('#alerts tbody tr.alert-row').length === 4",
                               timeout=10_000)
        assert page.locator("#ready").text_content() != "pipeline not reachable"
        texts = page.locator("#alerts tbody tr.alert-row td:nth-child(5)").all_text_contents()
        assert sorted(texts) == ["password 3", "password four", "password one", "password two"]
        assert page.locator("#at option").count() > 0  # the part of the page after the alerts rendered too
        assert errors == [], errors


def test_the_live_tail_shows_the_start_of_huge_texts(tmp_path: Path) -> None:
    """A hundred events of half a MiB each would be fifty MB of text in the page's live tail."""
    events = tmp_path / "in.jsonl"
    events.write_text("".join(json.dumps({"channel": "visual_index", "unix_ts": 1700000000.0 + i * 0.05,
                                          "data": {"text": "big " + "x" * 500_000}}) + "\n" for i in range(200)))
    # paced (20 a second): the tail attaches while they flow
    with pipeline_in_thread(config(tmp_path, events, speed=1), to_the_end=False) as base, browser_page() as page:
        page.goto(base + "/")
        page.wait_for_function("document.querySelectorAll('#events li').length >= 3", timeout=15_000)
        lengths = page.evaluate("[...document.querySelectorAll('#events li')].map((li) => li.textContent.length)")
        assert max(lengths) <= 1300, max(lengths)
        assert (page.locator("#events li").first.text_content() or "").rstrip().endswith("…")


def test_object_valued_fields_that_cannot_become_strings_do_not_break_the_page(tmp_path: Path) -> None:
    """Fields come off the wire: an `rtstream_name` of `{"toString": 1}` (copied into every alert the event
    fires) made the page's String() throw on each poll, so it showed "pipeline not reachable" and stopped
    updating until 20 other alerts had come; in the live tail it dropped the tap and reconnected."""
    events = tmp_path / "in.jsonl"
    odd = {"toString": 1, "valueOf": 2}
    events.write_text("".join(json.dumps({"channel": "visual_index", "unix_ts": 1700000000.0 + i * 0.05,
                                          "rtstream_name": odd,
                                          "data": {"text": f"password {i}", "start": i}}) + "\n"
                              for i in range(120)))
    with pipeline_in_thread(config(tmp_path, events, speed=1), to_the_end=False) as base, browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        page.wait_for_function("document.querySelectorAll('#events li').length >= 3 && "
                               "document.querySelectorAll('#alerts tbody tr.alert-row').length >= 1", timeout=15_000)
        assert page.locator("#ready").text_content() != "pipeline not reachable"
        stream = page.locator("#alerts tbody tr.alert-row td:nth-child(4)").first.text_content() or ""
        assert json.loads(stream) == odd
        assert "(reconnecting…)" not in (page.locator("#tap-state").text_content() or "")
        assert errors == [], errors


def test_the_live_tail_follows_once_a_tap_place_is_free(tmp_path: Path) -> None:
    """With all 16 tap places taken the page's tail is refused (503); it said so and never asked again, so the
    tail stayed empty until the page was reloaded. It asks again and follows once a place is free."""
    import socket

    events = replay_file(tmp_path / "in.jsonl", 2400, step=0.025, alert_every=100)  # 40 events/s
    with pipeline_in_thread(config(tmp_path, events, speed=1), to_the_end=False) as base, browser_page() as page:
        host, port = base.removeprefix("http://").split(":")
        taps = []
        for _ in range(16):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /tap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")  # (its headers: it is attached)
            taps.append(s)
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('tap-state').textContent.includes('HTTP 503')",
                               timeout=10_000)
        for s in taps:
            s.close()
        page.wait_for_function("document.querySelectorAll('#events li').length >= 3", timeout=15_000)
        assert "following" in (page.locator("#tap-state").text_content() or "")
