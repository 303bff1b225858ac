"""`pipeline report`: the demo's output as a page in a real headless browser; hostile text stays text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.report.build import build_reports
from pipeline.report.collect import MAX_ALERTS, MAX_MARKS, Collector
from tests.browser import browser_page

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '</title></text><script>window.pwned=1</script><img src=x onerror="window.pwned=2">"\'&amp;'


def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo (emulator + real SDK + controller + stages), run at full speed."""
    cwd = tmp_path_factory.mktemp("demo")
    res = cli(["run", "-q", str(ROOT / "config/demo.yaml")], cwd, {"DEMO_SPEED": "0"})
    assert res.returncode == 0, res.stderr
    return cwd / "out" / "demo"


def test_demo_report_in_headless_chromium(demo_out: Path, tmp_path: Path) -> None:
    res = cli(["report", str(demo_out), "-o", str(tmp_path / "report.html")], tmp_path)
    assert res.returncode == 0, res.stderr
    page_file = tmp_path / "report.html"
    assert res.stdout.strip() == str(page_file)
    html = page_file.read_text()
    assert "src=" not in html and 'href="http' not in html  # nothing to fetch at view time
    alerts = [orjson.loads(x) for x in (demo_out / "alerts.jsonl").read_bytes().splitlines()]
    with browser_page() as page:
        errors: list[str] = []
        requests: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        shot = page.screenshot(full_page=True)
        page.goto("about:blank")
        blank = page.screenshot(full_page=True)
        page.goto(page_file.as_uri())
        lanes = page.eval_on_selector_all("svg .lane", "els => els.map(e => e.dataset.lane)")
        assert sorted(lanes) == ["display:1", "mic:default", "system_audio:default"]
        assert page.locator("tr.alert-row").count() == len(alerts)  # events.jsonl + alerts.jsonl: no duplicates
        assert page.locator("tr.talk-row").count() == 2
        # keyword counts: every matched keyword of the rules' alerts, counted once per alert that matched it
        want: dict[str, int] = {}
        for a in alerts:
            for k in a["data"].get("matched") or []:
                want[k] = want.get(k, 0) + 1
        chips = page.eval_on_selector_all("span.chip.kw", "els => els.map(e => e.textContent)")
        assert want and sorted(chips) == sorted(f"{k} {n}" for k, n in want.items())
        # hover: the tooltip shows the mark's text
        mark = page.locator("svg .m.visual_index").first
        mark.hover()
        tip = page.locator("#tip")
        assert tip.is_visible() and "visual index" in (tip.text_content() or "")
        # an alert's time jumps to (and highlights) its mark on the timeline
        link = page.locator("tr.alert-row a.jump").first
        target = link.get_attribute("data-mark")
        link.click()
        assert "hl" in (page.locator(f"#{target}").get_attribute("class") or "")
    assert errors == []
    assert all(u.startswith(("file:", "about:", "data:")) for u in requests), requests
    assert len(shot) > 30_000 and len(shot) > 5 * len(blank)  # a rendered page, not a blank one


def _hostile_events() -> list[dict[str, Any]]:
    sid = "cap-<b>x</b>/../../evil"
    return [
        {"event": "capture_session.active", "capture_session_id": sid, "status": HOSTILE, "unix_ts": 1000.0,
         "data": {"rtstreams": [{"rtstream_id": "r1", "name": HOSTILE}]}},
        {"channel": "visual_index", "rtstream_id": "r1",
         "data": {"text": HOSTILE, "start": 1_000_500, "end": 1_002_000}},
        {"channel": "alert", "rtstream_id": "r1", "origin": HOSTILE,
         "data": {"event_label": HOSTILE, "severity": HOSTILE, "timestamp": 1_001_000, "text": HOSTILE,
                  "matched": [HOSTILE]}},
        {"channel": "transcript", "rtstream_id": "r1", "capture_session_id": sid,
         "data": {"text": HOSTILE, "start": 1_003_000, "end": 1_004_000, "is_final": True}},
    ]


def test_hostile_event_text_is_shown_as_text(tmp_path: Path) -> None:
    src = tmp_path / "in" / "events.jsonl"
    src.parent.mkdir()
    src.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in _hostile_events()))
    (path,) = build_reports([str(src.parent)], None)
    assert path.parent == src.parent and path.name.startswith("report-cap-_b_x_b_")  # no path from the wire
    html = path.read_text()
    assert "<script>window.pwned" not in html and "<img src=x" not in html and "</title></text>" not in html
    with browser_page() as page:
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        page.goto(path.as_uri())
        assert page.evaluate("window.pwned") is None
        assert page.locator("script").count() == 1 and page.locator("img").count() == 0
        row = page.locator("tr.alert-row").first
        assert HOSTILE in (row.locator("td.text").text_content() or "")
        assert HOSTILE in (row.text_content() or "")
        page.locator("svg .m.transcript").first.hover()
        assert HOSTILE in (page.locator("#tip").text_content() or "")
        assert page.evaluate("window.pwned") is None
    assert dialogs == []


def test_huge_input_is_streamed_and_bounded(tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    with open(src, "wb") as fh:
        fh.write(orjson.dumps({"event": "capture_session.active", "capture_session_id": "c", "unix_ts": 1.0,
                               "data": {"rtstreams": [{"rtstream_id": "r1", "name": "mic"}]}}) + b"\n")
        fh.write(b"x" * (2 << 20) + b"\n")  # one absurdly long line: skipped, not loaded
        for i in range(60_000):
            fh.write(orjson.dumps({"channel": "transcript", "rtstream_id": "r1", "capture_session_id": "c",
                                   "data": {"text": f"word {i}", "start": 1000 + i * 1000,
                                            "end": 1500 + i * 1000, "is_final": True}}) + b"\n")
            if i % 5 == 0:  # an alert storm on the same stream must not crowd the transcripts off the timeline
                fh.write(orjson.dumps({"channel": "alert", "rtstream_id": "r1", "capture_session_id": "c",
                                       "data": {"event_label": "storm", "timestamp": 1000 + i * 1000}}) + b"\n")
    c = Collector().read([src])
    lane = c.sessions["c"].lanes["mic"]
    assert c.skipped == 1 and lane.seen == 72_000 and lane.words == 120_000
    assert lane.talk_ms == 60_000 * 500
    for channel in ("transcript", "alert"):
        marks = lane.tracks[channel].marks
        assert MAX_MARKS // 2 <= len(marks) <= MAX_MARKS
        assert marks[0].start == 1000 and marks[-1].start > 1000 + 55_000 * 1000  # thinned evenly, not cut off
    assert len(c.sessions["c"].alerts) == MAX_ALERTS and c.sessions["c"].alerts_total == 12_000
    (path,) = build_reports([str(src)], str(tmp_path / "r.html"))
    html = path.read_text()
    assert path.stat().st_size < 2_000_000 and "10000 more alerts not listed" in html
    linked = set(re.findall(r'data-mark="(m\d+)"', html))
    assert linked and all(f'id="{m}"' in html for m in linked)  # every jump link has its mark


def test_several_sessions_and_errors(tmp_path: Path) -> None:
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"".join(orjson.dumps(
        {"channel": "transcript", "capture_session_id": sid, "rtstream_id": "r", "data": {"text": "hi", "start": 5000}}
    ) + b"\n" for sid in ("cap-a", "cap-b")) + b"not json\n[1]\n")
    paths = build_reports([str(src)], str(tmp_path / "r.html"))
    assert sorted(p.name for p in paths) == ["r-cap-a.html", "r-cap-b.html"]
    res = cli(["report", str(tmp_path / "missing")], tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such file or directory" in res.stderr
    res = cli(["report", str(src), "--gap", "soon"], tmp_path)
    assert res.returncode == 2 and "--gap" in res.stderr and "Traceback" not in res.stderr


def test_gaps_and_backfills_are_shown(tmp_path: Path) -> None:
    def tr(t: int, **extra: Any) -> dict[str, Any]:
        return {"channel": "transcript", "capture_session_id": "cap-g", "rtstream_id": "r",
                "data": {"text": f"at {t}", "start": t, "end": t + 900, "is_final": True}, **extra}

    events = [tr(1_000_000 + i * 1000) for i in range(10)]  # 10 s of speech
    events += [tr(1_080_000 + i * 1000, backfill=True) for i in range(5)]  # 70 s of silence, then a backfill
    src = tmp_path / "g.jsonl"
    src.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    (path,) = build_reports([str(src)], str(tmp_path / "g.html"), gap_ms=30_000)
    html = path.read_text()
    assert "no events for <b>1m 10s</b>" in html
    assert 'class="m transcript backfill"' in html and 'class="backfill-span"' in html
    assert "backfilled events from" in html and '<div class="v">5</div><div class="k">backfilled</div>' in html
    (quiet,) = build_reports([str(src)], str(tmp_path / "q.html"), gap_ms=120_000)
    assert "no events for <b>" not in quiet.read_text()


def test_lifecycle_keeps_arrival_order_on_equal_times(tmp_path: Path) -> None:
    src = tmp_path / "l.jsonl"
    statuses = ["created", "starting", "active", "stopping", "stopped", "exported"]
    src.write_bytes(b"".join(orjson.dumps({"event": f"capture_session.{s}", "capture_session_id": "c", "status": s,
                                           "unix_ts": 100.0}) + b"\n" for s in statuses))
    (path,) = build_reports([str(src)], str(tmp_path / "l.html"))
    html = path.read_text()
    table = html[html.index("<h2>Lifecycle</h2>"):]
    assert [table.index(f"<td>{s}</td>") for s in statuses] == sorted(table.index(f"<td>{s}</td>") for s in statuses)


@pytest.mark.timeout(30)
def test_an_event_time_far_off_the_rest_keeps_the_axis_bounded(tmp_path: Path) -> None:
    src = tmp_path / "far.jsonl"
    events = [{"channel": "transcript", "capture_session_id": "cap-f", "rtstream_id": "r",
               "data": {"text": "on time", "start": 1_700_000_000_000, "end": 1_700_000_001_000}},
              # unix_ts in ms by mistake: 1.7e15 ms, some 54,000 years later
              {"channel": "transcript", "capture_session_id": "cap-f", "rtstream_id": "r",
               "unix_ts": 1_700_000_005_000, "data": {"text": "ms by mistake"}}]
    src.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    (path,) = build_reports([str(src)], str(tmp_path / "f.html"))
    html = path.read_text()
    assert 0 < html.count('class="tick"') <= 60 and path.stat().st_size < 200_000


def test_channel_names_off_the_wire_are_counted_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "ch.jsonl"
    with open(src, "wb") as fh:
        fh.write(orjson.dumps({"channel": "transcript", "capture_session_id": "c", "rtstream_id": "r",
                               "data": {"text": "hi", "start": 5000}}) + b"\n")
        for i in range(5000):  # every line a new channel name, some of them long
            fh.write(orjson.dumps({"channel": f"ch-{i}-" + "x" * (i % 3 * 50_000), "capture_session_id": "c",
                                   "data": {"start": 6000 + i}}) + b"\n")
    session = Collector().read([src]).sessions["c"]
    assert len(session.counts) <= 40 and sum(session.counts.values()) == 5001
    assert all(len(k) <= 80 for k in session.counts) and session.counts["transcript"] == 1
    (path,) = build_reports([str(src)], str(tmp_path / "ch.html"))
    assert path.stat().st_size < 100_000 and "other channels" in path.read_text()


def test_session_ids_alike_but_for_unsafe_characters_get_a_page_each(tmp_path: Path) -> None:
    src = tmp_path / "twins.jsonl"
    src.write_bytes(b"".join(orjson.dumps(
        {"channel": "transcript", "capture_session_id": sid, "rtstream_id": "r", "data": {"text": sid, "start": 5000}}
    ) + b"\n" for sid in ("cap/1", "cap?1", "cap:1")))
    for out in (str(tmp_path / "r.html"), str(tmp_path / "dir")):
        paths = build_reports([str(src)], out)
        assert len(set(paths)) == 3 and all(p.is_file() for p in paths)
        assert sorted(sid for p in paths for sid in ("cap/1", "cap?1", "cap:1") if f">{sid}<" in p.read_text()) \
            == ["cap/1", "cap:1", "cap?1"]


def test_stream_lists_of_lifecycle_events_are_remembered_in_bounded_memory(tmp_path: Path) -> None:
    """Each `capture_session.active` lists its streams; what is remembered of them (until the end of the run)
    is short, however long the ids and names in the file."""
    src = tmp_path / "life.jsonl"
    with open(src, "wb") as fh:
        for i in range(20):
            streams = [{"rtstream_id": f"r{i}-{j}-" + "i" * (j % 2 * 5000), "name": f"n{j}-" + "n" * 5000}
                       for j in range(64)]
            fh.write(orjson.dumps({"event": "capture_session.active", "capture_session_id": "s" * 5000,
                                   "unix_ts": 100.0 + i, "data": {"rtstreams": streams}}) + b"\n")
        fh.write(orjson.dumps({"channel": "transcript", "rtstream_id": "r0-0-", "data": {"text": "hi",
                                                                                      "start": 200_000}}) + b"\n")
    c = Collector()
    out = c.read([src])
    kept = [*c._stream_session, *c._stream_session.values(), *c._stream_name.values()]
    assert kept and max(map(len, kept)) <= 256
    (session,) = out.sessions.values()  # the transcript found its session through the list
    assert session.counts.get("transcript") == 1 and "n0-" in next(iter(session.lanes))
