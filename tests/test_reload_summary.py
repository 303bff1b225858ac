"""The summary's `alerts fired by rules` counts the whole run across reloads.

It summed the running rules stages only: a reload that moved the rules stage (a filter added in front), or
removed or renamed a rule's stage, dropped every alert fired before it from the total (212 said, 400 written).

Real parts: `pipeline run` of a replay in a subprocess, SIGHUP, the summary on stderr.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.procs import finish, pipeline_run, stop_process


def test_alerts_fired_before_a_reload_that_moves_the_rules_stage_stay_counted(tmp_path: Path) -> None:
    events = tmp_path / "in.jsonl"
    events.write_text("".join(json.dumps({"channel": "transcript", "rtstream_id": f"r{i}", "unix_ts": 1_700_000_000 + i,
                                          "data": {"text": f"apple {i}"}}) + "\n" for i in range(400)))
    out = tmp_path / "o.jsonl"
    p = tmp_path / "p.yaml"

    def write(front: str) -> None:
        p.write_text(f"""name: f
source: {{type: replay, path: {events}, speed: 200}}
stages:
{front}  - {{type: rules, rules: [{{name: apple, keywords: [apple]}}]}}
sinks: [{{type: jsonl, path: {out}, flush_interval: 0}}]
""")

    write("")
    proc = pipeline_run(p, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while (out.read_bytes().count(b'"alert"') if out.exists() else 0) < 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        write("  - {type: filter, channels: [transcript]}\n")
        proc.send_signal(signal.SIGHUP)
        _, err = finish(proc, 30)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "reload (SIGHUP) applied: 2 processor(s)" in err, err  # (the replay lasts 2 s: the reload is mid-run)
    alerts = out.read_bytes().count(b'"alert"')
    assert alerts == 400 and "  alerts fired by rules: 400\n" in err, (alerts, err)
