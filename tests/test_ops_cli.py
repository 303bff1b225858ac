"""`pipeline top`, `pipeline tap` (in a pty, against a running pipeline), JSON logs, the status line,
the progress bar and --summary-json."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import free_port
from tests.operator_harness import config, replay_file

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@contextlib.contextmanager
def http_run(tmp_path: Path, events: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`pipeline run --http` on a replay at speed 1, once /ready answers 200: (its URL, the process).
    SIGINT at the end if it still runs."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([*PIPELINE, "run", str(config(tmp_path, events, speed=1)), "--http",
                             url.removeprefix("http://"), "-q"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "pipeline never became ready"
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(20)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[str]:
    """`pipeline run --http` on a paced replay (40 events/s, an alert every 2.5 s); yields its URL."""
    with http_run(tmp_path, replay_file(tmp_path / "in.jsonl", 2400, step=0.025, alert_every=100)) as (url, _):
        yield url


def in_pty(args: list[str], until: str | None, timeout: float = 15.0, cwd: Path = ROOT) -> tuple[str, int]:
    """Run a command on a pseudo-terminal until the regex `until` matches its screen output, then Ctrl-C it
    (`until=None`: until it exits by itself)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True, cwd=cwd)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not (
                until is not None and re.search(until, ANSI.sub("", out.decode("utf-8", "replace")))):
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
            elif proc.poll() is not None:
                break
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        # read on while it exits: a full pty buffer would block its last screen and so its exit
        exit_by = time.monotonic() + 10
        while True:
            if time.monotonic() > exit_by:
                proc.kill()
                screen = ANSI.sub("", out.decode("utf-8", "replace"))[-3000:]
                raise AssertionError(f"{args[3]}: no exit 10 s after Ctrl-C: {screen}")
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(10)
    finally:
        os.close(master)
    return ANSI.sub("", out.decode("utf-8", "replace")), code


def test_top_in_a_terminal(running: str) -> None:
    screen, code = in_pty([*PIPELINE, "top", running], until=r"source:replay\s+│\s+[1-9]")
    assert code == 0, screen
    for text in ("pipeline ops", "ready", "source:replay", "stages[1]:rules", "sinks[1]:jsonl", "in/s",
                 "latency", "last rule alerts", "critical"):
        assert text in screen, (text, screen[-3000:])
    rates = re.findall(r"source:replay\s+│\s+([\d.]+)", screen)
    assert any(float(r) > 0 for r in rates), screen[-3000:]  # a live rate, not only totals


def test_tap_in_a_terminal_shows_readable_alerts(running: str) -> None:
    screen, code = in_pty([*PIPELINE, "tap", running, "--at", "rules", "--channel", "alert"],
                          until=r"\[ALERT critical secret display:1\] password on screen")
    assert code == 0, screen
    assert "pipeline tap: following stages[1]:rules" in screen
    assert "[ALERT critical secret display:1] password on screen" in screen, screen


@pytest.mark.parametrize("viewer", ["tap", "top"])
def test_viewers_stop_on_ctrl_c_even_when_started_with_sigint_ignored(running: str, viewer: str) -> None:
    """A script's background job starts with SIGINT ignored, and so did every child of a test suite run that
    way: `pipeline tap`/`top` then never exited on Ctrl-C (SIGINT); `pipeline run` always did."""
    args = [*PIPELINE, viewer, running] + (["--at", "source"] if viewer == "tap" else [])
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        if viewer == "tap":  # it is following the stream once it has printed something
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            assert ready
        else:  # top off a terminal prints only when it stops: give it time to start and fetch
            time.sleep(3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tap_json_lines_for_jq(running: str) -> None:
    res = subprocess.run([*PIPELINE, "tap", running, "--at", "source", "--json", "--limit", "5"], env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    events = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(events) == 5 and all("id" in e for e in events)
    assert "limit reached" in res.stderr


def test_tap_and_top_errors_are_one_line(running: str) -> None:
    res = subprocess.run([*PIPELINE, "tap", running, "--at", "nowhere"], env=ENV, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "no tap point 'nowhere'" in res.stderr
    res = subprocess.run([*PIPELINE, "top", f"127.0.0.1:{free_port()}", "--once"], env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "cannot connect" in res.stderr


@pytest.mark.parametrize("url", ["localhost:notaport", "http://[::1:9464", "127.0.0.1:70000", "http://:9464"])
@pytest.mark.parametrize("viewer", ["top", "tap"])
def test_a_malformed_url_is_one_line(url: str, viewer: str) -> None:
    res = subprocess.run([*PIPELINE, viewer, url, *(["--once"] if viewer == "top" else [])], env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr == f"pipeline: expected the pipeline's operator URL like http://127.0.0.1:9464, got {url!r}\n"


def test_top_ends_with_the_pipeline(tmp_path: Path) -> None:
    """A replay that ends: `pipeline top` says so and exits 0, as `pipeline tap` does."""
    events = replay_file(tmp_path / "in.jsonl", 150, step=0.02)  # ~3 s at speed 1
    with http_run(tmp_path, events) as (url, _):
        screen, code = in_pty([*PIPELINE, "top", url, "--interval", "0.2"], until=None, timeout=30)
    assert code == 0 and "Traceback" not in screen, screen[-2000:]
    assert f"pipeline top: {url} stopped answering: the pipeline ended" in screen, screen[-2000:]
    assert "source:replay" in screen


def test_json_logs_status_line_and_summary_json(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 200, step=0.0075, garbage=2)  # ~1.5 s at speed 1
    cfg = config(tmp_path, events, speed=1, http=None, status_interval=1)  # the shortest interval allowed
    res = subprocess.run([*PIPELINE, "run", str(cfg), "--log-format", "json", "--log-level", "info",
                          "--summary-json", str(tmp_path / "summary.json")], env=ENV, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    status = [r for r in records if r["logger"] == "pipeline.status"]
    assert status and status[0]["message"].startswith("status: ") and "rate" in status[0]
    assert status[0]["queues"].keys() == {"sinks[0]:jsonl", "sinks[1]:jsonl"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    logged = next(r for r in records if r["logger"] == "pipeline.summary")
    assert logged["stages"] == summary["stages"] and logged["sinks"] == summary["sinks"]
    assert summary["stages"][0] == {"name": "source:replay", "kind": "source", "read": 200, "rejected": 2}
    assert summary["alerts_fired"] == 7 and summary["dead_lettered"] == 2 and summary["exit_code"] == 0
    assert [s["written"] for s in summary["sinks"]] == [207, 7]


def test_json_logs_of_a_stage_name_the_stage(tmp_path: Path) -> None:
    """Two sinks of one type log through one logger; the `stage` field says which one spoke."""
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens; no alert is ever sent to it
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: st\nsource: {{type: replay, path: in.jsonl}}\nsinks:\n"
                   f"  - {{type: jsonl, path: out.jsonl}}\n"
                   f"  - {{type: alert_forwarder, url: '{hook}', format: json}}\n"
                   f"  - {{type: alert_forwarder, url: '{hook}', format: slack}}\n")
    res = subprocess.run([*PIPELINE, "run", str(cfg), "--log-format", "json"], env=ENV, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines()]
    started = {r["message"].split()[1]: r.get("stage") for r in records
               if r["logger"] == "pipeline.sink.alert_forwarder" and " alerts to " in r["message"]}
    assert started == {"json": "sinks[1]:alert_forwarder", "slack": "sinks[2]:alert_forwarder"}, records


def test_an_unwritable_summary_json_path_is_refused_before_the_run(tmp_path: Path) -> None:
    """It used to be found only after the whole run (a meeting's worth), which then exited 2."""
    events = replay_file(tmp_path / "in.jsonl", 20)
    cfg = config(tmp_path, events, http=None)
    (tmp_path / "a-file").write_text("")
    res = subprocess.run([*PIPELINE, "run", str(cfg), "--summary-json", str(tmp_path / "a-file/s.json")], env=ENV,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "out.jsonl").exists(), res.stderr
    where = tmp_path / "a-file"
    assert res.stderr == f"pipeline: --summary-json: cannot write {where}/s.json: {where} is not a directory\n"


def test_text_status_line_and_log_level_after_the_subcommand(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 100, step=0.015)  # ~1.5 s at speed 1
    cfg = config(tmp_path, events, speed=1, http=None, status_interval=1)
    res = subprocess.run([*PIPELINE, "run", str(cfg), "--log-level", "warning"], env=ENV, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and "status:" not in res.stderr  # info lines hidden by the later --log-level
    res = subprocess.run([*PIPELINE, "run", str(cfg)], env=ENV, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    line = next(x for x in res.stderr.splitlines() if "status:" in x)
    queued = r"queued sinks\[0\]:jsonl=\d+ sinks\[1\]:jsonl=\d+"
    assert re.search(rf"status: \d+ ev/s, \d+ events, lag [\d.]+s, {queued}, rule alerts \d+", line), line


def test_replay_on_a_terminal_shows_a_progress_bar(tmp_path: Path) -> None:
    events = replay_file(tmp_path / "in.jsonl", 400, step=0.01)  # ~4 s at speed 1
    cfg = config(tmp_path, events, speed=1, http=None)
    screen, code = in_pty([*PIPELINE, "run", str(cfg)], until=None, timeout=30, cwd=tmp_path)
    assert code == 0, screen
    assert re.search(r"replay in\.jsonl .*\d+% .*\d+ events, \d+ ev/s", screen), screen[-2000:]
    # the time left, from the file position and the rate (rich prints -:--:-- until it has a rate)
    assert re.search(r"\d+ ev/s\s+\d+:\d\d:\d\d", screen), screen[-2000:]


def test_log_level_after_worker_reaches_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import pipeline.runtime.faust as faust_runtime
    from pipeline.cli import main

    seen: list[list[str]] = []
    monkeypatch.setattr(faust_runtime, "worker_main", lambda argv: seen.append(argv) or 0)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["worker", "x.yaml", "--log-level", "warning", "--log-format", "json"]) == 0
    finally:
        root.handlers[:], root.level = handlers, level
    assert seen == [["x.yaml", "--log-level", "warning", "--log-format", "json"]]


def test_summary_json_is_private_in_private_directories(tmp_path: Path) -> None:
    """Guarantees, Security: files we create are 0600, directories 0700. The summary (stage names, counts,
    the dead-letter path, the error) was written 0644 into parents made 0755."""
    events = replay_file(tmp_path / "in.jsonl", 5)
    cfg = config(tmp_path, events, http=None)
    target = tmp_path / "new" / "sub" / "summary.json"
    res = subprocess.run([*PIPELINE, "run", "-q", str(cfg), "--summary-json", str(target)], env=ENV,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(target.read_text())["exit_code"] == 0
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert [oct(d.stat().st_mode & 0o777) for d in (target.parent, target.parent.parent)] == [oct(0o700)] * 2


def test_a_summary_json_path_through_a_symlink_is_refused_before_the_run(tmp_path: Path) -> None:
    """Like every file the pipeline writes, the summary is not written through a symlink; the check comes
    before the run, not after a whole meeting."""
    events = replay_file(tmp_path / "in.jsonl", 5)
    cfg = config(tmp_path, events, http=None)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    res = subprocess.run([*PIPELINE, "run", "-q", str(cfg), "--summary-json", str(tmp_path / "link/s.json")],
                         env=ENV, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "out.jsonl").exists(), res.stderr
    assert "symlink" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "real/s.json").exists()


def test_top_waits_out_a_busy_endpoint(running: str) -> None:
    """The endpoint answers 503 (`Retry-After: 1`) while all its connections are taken; `pipeline top` took that
    for the end of the pipeline and exited. It keeps its last table and asks again."""
    import socket

    host, port = running.removeprefix("http://").split(":")
    proc = subprocess.Popen([*PIPELINE, "top", running, "--interval", "0.1"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    held: list[socket.socket] = []
    try:
        time.sleep(1)  # off a terminal it prints only at the end: give it time to start and fetch
        assert proc.poll() is None
        held += [socket.create_connection((host, int(port))) for _ in range(64)]  # every connection it takes
        while True:  # (top's own may be among them for a moment)
            s = socket.create_connection((host, int(port)))
            held.append(s)
            s.settimeout(1)
            with contextlib.suppress(TimeoutError):
                if s.recv(100).startswith(b"HTTP/1.1 503"):
                    break
        time.sleep(1)  # ten of its refreshes are answered 503
        assert proc.poll() is None, proc.communicate()[1]
        for s in held:
            s.close()
        held.clear()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"stopped answering" not in err and b"source:replay" in out, err
