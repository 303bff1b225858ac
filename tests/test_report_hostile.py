"""`pipeline report` on hostile field types, as a real CLI process: one page, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.report.collect import Collector
from tests.test_report import ROOT, cli

T0 = 1772446500000


def alert(matched: Any) -> dict[str, Any]:
    return {"channel": "alert", "capture_session_id": "cap-1", "rtstream_id": "rts-1",
            "data": {"event_label": "code", "start": T0, "text": "password on screen", "matched": matched}}


@pytest.mark.parametrize("matched", [7, 1.5, True, {"password": 1}])
def test_an_alert_whose_matched_is_not_a_list_does_not_stop_the_report(tmp_path: Path, matched: Any) -> None:
    """`data.matched` comes off the wire (a plugin or VideoDB alert may set it to anything): a number made
    `pipeline report` die with TypeError and a traceback, so no page was written for any session."""
    events = [{"channel": "transcript", "capture_session_id": "cap-1", "rtstream_id": "rts-1",
               "data": {"text": "hello", "start": T0 - 1000, "end": T0}}, alert(matched), alert(["password"])]
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    res = cli(["report", str(tmp_path)], tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    page = (tmp_path / "report-cap-1.html").read_text()
    assert "password on screen" in page


def test_a_matched_string_is_not_counted_letter_by_letter() -> None:
    """A string iterated as a list counted each of its letters as a keyword."""
    c = Collector()
    c.add(alert("password"))
    c.add(alert(["password", 5, None]))
    assert c.out.sessions["cap-1"].keywords == {"password": 1}


def test_an_input_that_exists_but_is_not_a_file_is_named_as_such(tmp_path: Path) -> None:
    """A fifo (or /dev/zero) given as input was reported as "no such file or directory"."""
    import os

    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)
    res = cli(["report", str(fifo)], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"pipeline: {fifo}: not a regular file "
                                  "(expected JSONL files or a directory of them)")
    res = cli(["report", str(tmp_path / "missing.jsonl")], tmp_path)
    assert res.returncode == 2 and "no such file or directory" in res.stderr


def test_the_page_lists_a_bounded_number_of_gaps(tmp_path: Path) -> None:
    """Every stretch without events was drawn and listed: 20,000 events 31 s apart (2 MB of input; a sparse
    week-long session, or hostile timestamps) made 20,000 hatched rectangles and list items, a 3.6 MB page
    (1M distinct seconds are remembered per session: up to 1M of each). Now the 500 longest are shown."""
    def at(i: int) -> int:  # one hour-long outage after the 5,000th event: it must be among those shown
        return T0 + i * 31_000 + (3_600_000 if i >= 5_000 else 0)

    events = [{"channel": "visual_index", "capture_session_id": "cap-1", "rtstream_id": "rts-1",
               "data": {"text": "screen", "start": at(i), "end": at(i) + 1000}} for i in range(20_000)]
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    res = cli(["report", str(tmp_path)], tmp_path)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "report-cap-1.html").read_text()
    assert page.count('class="gap"') <= 500 and page.count("<li>no events for") <= 500
    assert "no events for <b>1h 00m 30s</b>" in page  # the longest stretch is kept
    assert "shorter stretches without events not listed" in page
    assert len(page) < 1_000_000, len(page)  # 3,634,797 before, 275,245 now


def test_sessions_past_the_cap_are_not_left_out_silently(tmp_path: Path) -> None:
    """Past 200 sessions, events were dropped without a word: 205 sessions gave 200 pages, exit 0, nothing said."""
    lines = [orjson.dumps({"channel": "transcript", "capture_session_id": f"cap-{i:03d}",
                           "data": {"text": "hi", "start": T0 + i * 10 + k, "end": T0 + i * 10 + 5}}) + b"\n"
             for i in range(205) for k in range(2)]
    (tmp_path / "events.jsonl").write_bytes(b"".join(lines))
    res = cli(["report", str(tmp_path), "-o", str(tmp_path / "pages")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "pages").glob("*.html"))) == 200
    assert "10 event(s) of sessions past the first 200 were left out" in res.stderr


def test_the_page_draws_a_bounded_number_of_marks_in_all(tmp_path: Path) -> None:
    """Marks were capped per lane and channel only (1,500), and a mark's tooltip is up to ~2.5 KB escaped:
    8 streams x 4 channels of quote-filled texts (63 MB) made a 157 MB page and took 690 MB of memory.
    Now the page draws at most 12,000 marks; small tracks (here the alerts) keep all of theirs."""
    text = '"' * 400
    events = [{"channel": "transcript", "capture_session_id": "cap-1", "rtstream_id": f"rts-{lane}",
               "data": {"text": text, "start": T0 + i * 1000, "end": T0 + i * 1000 + 900}}
              for lane in range(12) for i in range(1400)]
    events += [{**alert(["password"]), "data": {**alert(["password"])["data"], "start": T0 + i * 60_000}}
               for i in range(5)]
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    res = cli(["report", str(tmp_path)], tmp_path)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "report-cap-1.html").read_text()
    assert page.count('class="m transcript') <= 12_000
    assert page.count('class="m alert') == 5 and page.count('class="jump"') == 5  # each alert row finds its mark
    assert '<div class="v">16805</div>' in page  # the counts still cover every event
    assert len(page) < 40_000_000, len(page)


def test_a_line_nested_deeper_than_the_pipeline_writes_is_skipped(tmp_path: Path) -> None:
    """JSON takes 1,024 levels; str() of a field 1,000 deep (a corrupt or forged input file) raised
    RecursionError and the report stopped with a traceback. Such a line is now skipped and counted."""
    deep = b"[" * 1000 + b"]" * 1000
    (tmp_path / "events.jsonl").write_bytes(
        b'{"channel":' + deep + b',"capture_session_id":"cap-1","unix_ts":1772446500}\n'
        + b'{"capture_session_id":"cap-1","channel":"transcript","data":{"text":' + deep + b',"start":1}}\n'
        + orjson.dumps(alert(["password"])) + b"\n")
    res = cli(["report", str(tmp_path)], tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    page = (tmp_path / "report-cap-1.html").read_text()
    assert "2 unreadable lines skipped" in page and page.count('class="alert-row"') == 1


def test_streams_are_given_their_session_whichever_file_is_read_first(tmp_path: Path) -> None:
    """Without `enrich`, events carry no capture_session_id and the session comes from the stream list of its
    `capture_session.active` event. With `{channel}.jsonl` files, `alert.jsonl` and `audio_index.jsonl` are
    read before `capture_session.jsonl`: their events went to an `unknown-session` page of their own."""
    out = tmp_path / "out"
    out.mkdir()
    by_channel: dict[str, list[bytes]] = {}
    for line in (ROOT / "config/samples/meeting-session.jsonl").read_bytes().splitlines():
        ev = orjson.loads(line)
        ch = ev.get("channel") or "capture_session"
        if ch != "capture_session":
            ev.pop("capture_session_id", None)
        by_channel.setdefault(ch, []).append(orjson.dumps(ev) + b"\n")
    for ch, lines in by_channel.items():
        (out / f"{ch}.jsonl").write_bytes(b"".join(lines))
    assert sorted(by_channel)[:2] == ["alert", "audio_index"]  # read before the lifecycle file
    res = cli(["report", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    (page,) = [Path(p) for p in res.stdout.split()]
    assert page.name == "report-cap-7f3a9c21-demo.html"
    html = page.read_text()
    assert html.count('class="alert-row"') == len(by_channel["alert"])
    assert f"audio_index {len(by_channel['audio_index'])}," in html


def test_dead_letter_files_are_not_read_as_events(tmp_path: Path) -> None:
    """`pipeline listen` writes `videodb_dead_letter.jsonl` beside its events, and a config may name its dead
    letter `dead.jsonl`: only files with `dead-letter` in their name were skipped, so the records (a frame that
    was not JSON, an event a sink refused, wrapped) made a page of their own, `unknown-session`."""
    (tmp_path / "videodb_events.jsonl").write_bytes((ROOT / "config/samples/meeting-session.jsonl").read_bytes())
    record = {"ts": "2026-03-02T10:20:00.000Z", "unix_ts": 1772446800.0, "stage": "listen",
              "reason": "not a JSON object", "raw": "[1, 2]"}
    (tmp_path / "videodb_dead_letter.jsonl").write_bytes(orjson.dumps(record) + b"\n")
    refused = {**record, "stage": "sinks[0]:jsonl", "reason": "sink failed before writing",
               "event": {"channel": "transcript", "rtstream_id": "rts-x", "data": {"text": "hi", "start": T0}}}
    (tmp_path / "dead.jsonl").write_bytes(orjson.dumps(refused) + b"\n")
    res = cli(["report", str(tmp_path)], tmp_path)
    assert res.returncode == 0, res.stderr
    (page,) = [Path(p) for p in res.stdout.split()]
    assert page.name == "report-cap-7f3a9c21-demo.html"
    assert "1 dead-letter record" in page.read_text()  # dead.jsonl: read (its name does not say), not counted
