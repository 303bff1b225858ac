"""`--summary-json` must account for every event as the text summary does: what was lost (neither written nor
dead-lettered) and what a disk buffer keeps for the next run. A real `pipeline run`, real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(40)


def test_summary_json_counts_lost_and_spooled_events_like_the_text_summary(tmp_path: Path) -> None:
    """Before: the JSON had neither `LOST N` nor `left spooled N`: a run that
    lost 300 events and kept 300 in a spool read, to a script, like one that wrote nothing and lost nothing."""
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "x", "start": 1710000000000 + i}}) + b"\n"
        for i in range(2000)))
    (tmp_path / "dl").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / f"{name}.hold").touch()  # both sinks stall
    (tmp_path / "p.yaml").write_text(f"""
name: accounted
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 100}}
runtime: {{queue_size: 1, drain_timeout: 0.5s}}
sinks:
  - type: tests.slow_sink:DeadLetterGoneSink
    path: {tmp_path}/a.txt
    delay: 0
    buffer: {{type: memory, max_bytes: 30000, when_full: dead_letter}}
  - {{type: tests.slow_sink:GatedSink, path: {tmp_path}/b.txt, delay: 0, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dl/dead.jsonl
state_dir: {tmp_path}/state
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml", "--summary-json", "s.json"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res.stderr
    text = res.stderr
    lost = int(re.search(r"LOST (\d+) event\(s\) that could not be dead-lettered", text).group(1))  # type: ignore[union-attr]
    spooled = int(re.search(r"left spooled (\d+)", text).group(1))  # type: ignore[union-attr]
    assert lost > 0 and spooled > 0, text
    js = orjson.loads((tmp_path / "s.json").read_bytes())
    assert js["lost"] == lost and "cannot write the dead-letter file" in js["lost_reason"], js
    a, b = js["sinks"]
    assert a["failed"] == lost and "left_spooled" not in a, js
    assert b["left_spooled"] == spooled, js
    read = js["stages"][0]["read"]
    assert b["written"] + b["left_spooled"] == read, js  # every event read is in the spool or written
