"""A rules stage keeps its alerts in state.db until every sink has them; an alert forwarder says which alerts it
has not delivered yet (`holding_since`), so the runtime waits for those instead of flushing it once a second:
that flush waited for the webhook (here 3 s an answer) and stalled the commit loop, with a warning each time.
A `kill -9` before the webhook answered: the next run sends the alert again (same Idempotency-Key)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.procs import finish, pipeline_run
from tests.test_rules_kill import secret
from tests.test_window_kill import SOURCE, write_config
from tests.test_window_outbox_commit import outbox_rows


class Hook:
    """A webhook answering 200 after `delay` seconds, noting each request's Idempotency-Key."""

    def __init__(self, delay: float) -> None:
        self.keys: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                hook.keys.append(self.headers.get("Idempotency-Key") or "")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook(3.0)
    try:
        yield h
    finally:
        h.server.shutdown()


def config(tmp_path: Path, part: range, hook: Hook, hold: bool) -> Path:
    (tmp_path / "lines_src.py").write_text(SOURCE)
    rule = "{type: rules, rules: [{name: secret, keywords: [password], cooldown: 1h}]}"
    cfg = write_config(tmp_path, part, hold, stage=rule, out="alert", event_of=secret)
    cfg.write_text(cfg.read_text().replace("dead_letter:", f"  - {{type: alert_forwarder, url: '{hook.url}'}}\n"
                                           "runtime: {drain_timeout: 1s}\ndead_letter:"))
    return cfg


def kept(tmp_path: Path) -> int | None:
    return outbox_rows(tmp_path / "state" / "state.db")


def test_kept_alerts_wait_for_the_webhook_without_flushing_it(tmp_path: Path, hook: Hook) -> None:
    proc = pipeline_run(config(tmp_path, range(0, 10), hook, hold=True), cwd=tmp_path, plugins=True)
    try:
        deadline = time.monotonic() + 30
        while not hook.keys and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(hook.keys) == 1
        while kept(tmp_path) != 0 and time.monotonic() < deadline:  # forgotten once delivered
            time.sleep(0.1)
        assert kept(tmp_path) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc, 30)
    assert proc.returncode == 0, err
    assert "flush has not returned" not in err, err  # (before: the runtime's flush waited 3 s for the webhook)


def test_an_alert_the_webhook_had_not_answered_at_a_kill_9_is_sent_again(tmp_path: Path, hook: Hook) -> None:
    proc = pipeline_run(config(tmp_path, range(0, 10), hook, hold=True), cwd=tmp_path, plugins=True)
    try:
        deadline = time.monotonic() + 30
        while kept(tmp_path) != 1 and time.monotonic() < deadline:  # fired: the webhook is answering slowly
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        finish(proc, 10)
    second = pipeline_run(config(tmp_path, range(10, 20), hook, hold=False), cwd=tmp_path, plugins=True)
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    time.sleep(3.5)  # the first request, cut by the kill, may still be answered and noted
    assert len(set(hook.keys)) == 1 and 1 <= len(hook.keys) <= 2, hook.keys
    lines = (tmp_path / "alert.jsonl").read_text().splitlines()
    assert [json.loads(x)["data"]["event_label"] for x in lines] == ["secret"]
