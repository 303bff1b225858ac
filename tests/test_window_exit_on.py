"""`window` flushes its open windows when the controller ends the run (`exit_on`), not only at a source's end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_exit_on_exported_flushes_open_windows(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"""
name: w
videodb: {{api_key: k-test-0123456789, emulator: {{speed: 0}}}}
source: {{type: videodb}}
controller:
  type: capture_session
  end_user_id: u
  on_active: {{transcript: true, index_visuals: {{prompt: screen}}}}
  exit_on: exported
stages:
  - {{type: enrich}}
  - {{type: window, size: 10m, allowed_lateness: 1h}}   # nothing closes before the run ends
sinks:
  - {{type: jsonl, path: {tmp_path}/metrics.jsonl, channels: [metrics], flush_interval: 0}}
  - {{type: jsonl, path: {tmp_path}/events.jsonl, flush_interval: 0,
      channels: [transcript, visual_index, audio_index, alert, capture_session]}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", str(cfg)], capture_output=True,
                         text=True, timeout=90, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "capture_session.exported"  # the run ended on exit_on
    assert metrics and {m["key"]["capture_session_id"] for m in metrics} == {events[-1]["capture_session_id"]}
    for ch in ("transcript", "visual_index", "capture_session"):  # every event, the exported one included
        want = sum(1 for e in events if (e.get("channel") or ("capture_session" if "event" in e else None)) == ch)
        assert want and sum(m["data"]["events"].get(ch, 0) for m in metrics) == want, ch
