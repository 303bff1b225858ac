"""A FIFO where an output or state file should be: refused at once with one line, never a hang.

Opening a FIFO for writing blocks until a reader comes, inside the event loop: `pipeline run` hung at start
and SIGTERM could not end it (its handler runs on the blocked loop). Real processes, real FIFOs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("where", ["dead_letter", "jsonl", "spool"])
def test_a_fifo_in_place_of_a_file_is_one_line_not_a_hang(tmp_path: Path, where: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript", "id": 1}\n')
    dead, out = tmp_path / "dead.jsonl", tmp_path / "out.jsonl"
    spool = tmp_path / "state" / "spool" / "sinks-0-jsonl"
    fifo = {"dead_letter": dead, "jsonl": out, "spool": spool / f"{0:020d}.seg"}[where]
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo, 0o600)
    buffer = ", buffer: {type: disk}" if where == "spool" else ""
    (tmp_path / "p.yaml").write_text(f"""
name: fifo
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks:
  - {{type: jsonl, path: {out}{buffer}}}
dead_letter: {dead}
state_dir: {tmp_path}/state
""")
    try:
        res = subprocess.run([*PIPELINE, "run", str(tmp_path / "p.yaml")], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("pipeline run hung on the FIFO") from None
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("pipeline:")]
    assert res.returncode != 0 and len(errors) == 1 and str(fifo) in errors[0], res.stderr
    assert "Traceback" not in res.stderr
