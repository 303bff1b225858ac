"""A jsonl sink whose disk fills mid-batch: the summary counts what the file holds, and the file holds whole lines.

A real kernel limit (RLIMIT_FSIZE in the child `pipeline run`, with SIGXFSZ ignored, as a full disk does)
makes write() take part of a batch's bytes and then fail.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from tests.operator_harness import replay_file
from tests.procs import ROOT

LIMIT = 48 * 1024  # bytes any file of the run may hold: the output fills up, the dead letter (one batch) does not


def _full_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: a short write, then EFBIG (as ENOSPC)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_disk_filling_mid_batch_leaves_whole_lines_counted_as_written(tmp_path: Path) -> None:
    """Before: the lines of the failing batch that reached the file were counted neither written nor failed
    (summary: written 327, failed 90 of 457, the file held 367), and the file ended in half a line whose tail
    alone was dead-lettered (`{"raw": ...}`), so that event could be read back from neither file."""
    events = replay_file(tmp_path / "in.jsonl", 3000)
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: full
source: {{type: replay, path: {events}, speed: 0, batch_size: 64}}
stages:
  - type: rules
    rules: [{{name: secret, keywords: [password], severity: critical}}]
sinks:
  - {{type: jsonl, path: {out}, flush_interval: 0}}
dead_letter: {dead}
""")
    summary = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--summary-json", str(summary)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=60, preexec_fn=_full_disk)
    assert res.returncode == 1, res.stderr
    assert f"{out}: cannot write: File too large" in res.stderr, res.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n"), data[-200:]  # no half line left behind
    lines = [orjson.loads(line) for line in data.splitlines()]
    letters = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert letters and all("raw" not in d["event"] for d in letters), letters[0]  # whole events, readable back
    sink = orjson.loads(summary.read_bytes())["sinks"][0]
    assert (sink["written"], sink["failed"]) == (len(lines), len(letters))
    rules = orjson.loads(summary.read_bytes())["stages"][1]
    assert rules["out"] == len(lines) + len(letters)  # every event the sink was given: in the file or dead-lettered
    ids = [e["id"] for e in lines if "id" in e] + [d["event"]["id"] for d in letters if "id" in d["event"]]
    assert sorted(ids) == list(range(len(ids)))  # each exactly once, none in both files
