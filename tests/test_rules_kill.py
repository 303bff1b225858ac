"""A `pipeline run` killed (-9) just after a rule fired, before its jsonl sink wrote the alert line: the rule's
cooldown was saved in state.db with the batch, the line died in the sink's buffer, and the restart, finding
the rule cooling down, never fired it again: the alert was lost for good. Now the alerts a rules stage makes
are kept in state.db with the cooldowns they set, until every sink has them; the next run writes them first."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import finish, pipeline_run
from tests.test_window_kill import SOURCE, T0, write_config


def secret(s: int) -> dict[str, Any]:
    return {"channel": "transcript", "capture_session_id": "c", "rtstream_id": "rts-1",
            "data": {"text": f"the password is {s}", "start": T0 + s * 1000}}


def run(tmp_path: Path, part: range, hold: bool, match: str) -> subprocess.Popen[str]:
    """`word`: the rules stage's C engine; `substring`: its Python path."""
    (tmp_path / "lines_src.py").write_text(SOURCE)
    rule = f"{{type: rules, rules: [{{name: secret, keywords: [password], cooldown: 1h, match: {match}}}]}}"
    cfg = write_config(tmp_path, part, hold, stage=rule, out="alert", event_of=secret)
    return pipeline_run(cfg, cwd=tmp_path, plugins=True)


def cooldown_saved(state_db: Path) -> bool:
    try:
        db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM state WHERE map LIKE '%last_fired%'").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def alerts(tmp_path: Path) -> list[int]:
    path = tmp_path / "alert.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["data"]["timestamp"] for x in lines]


@pytest.mark.parametrize("match", ["word", "substring"])
def test_an_alert_fired_just_before_a_kill_9_is_written_by_the_next_run(tmp_path: Path, match: str) -> None:
    first = run(tmp_path, range(0, 10), hold=True, match=match)  # fires once (cooldown 1h), the line in a buffer
    try:
        deadline = time.monotonic() + 30
        while not cooldown_saved(tmp_path / "state" / "state.db"):
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        finish(first, 10)
    assert alerts(tmp_path) == []  # (what the kill took)
    second = run(tmp_path, range(10, 20), hold=False, match=match)  # within the cooldown: fires nothing itself
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    assert alerts(tmp_path) == [T0], err  # the first run's alert, once
