"""SIGTERM once the run is over and its summary is being written: the process finishes, exit 0, summary
complete. Real process, real signal; its stderr is a full pipe, so it waits in the summary's write."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def _blocked_in_pipe_write(pid: int) -> bool:
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()  # (anon_)pipe_write
    except OSError:
        return False


def test_a_sigterm_while_the_summary_is_written_ends_nothing(tmp_path: Path) -> None:
    """Before: the run's signal handlers were gone by then, and the default action ended the process (-15, no
    summary) though every row was written."""
    with open(tmp_path / "in.jsonl", "w") as fh:
        for i in range(20):
            fh.write(json.dumps({"channel": "transcript", "unix_ts": 1772446500.0 + i, "data": {"text": f"t{i}"}})
                     + "\n")
    (tmp_path / "p.yaml").write_text("name: p\nsource: {type: replay, path: in.jsonl}\n"
                                     "sinks: [{type: parquet, path: out}]\ndead_letter: dead.jsonl\n")
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    with os.fdopen(r, "rb") as reader:
        with os.fdopen(w, "wb", buffering=0) as writer:
            filler = 0
            while n := writer.write(b"x" * 4096):  # fill the pipe (None once full): the child's first write waits
                filler += n
            fcntl.fcntl(w, fcntl.F_SETFL, 0)
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                    stderr=writer)
        try:
            deadline = time.monotonic() + 30
            while not (list((tmp_path / "out").glob("*.parquet")) and _blocked_in_pipe_write(proc.pid)):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            err = reader.read()[filler:].decode()  # until the child exits and closes its end
            assert proc.wait(timeout=30) == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert re.search(r"parquet +written +20 +files 1\n", err) and "Traceback" not in err, err
    (done,) = (tmp_path / "out").glob("*.parquet")
    assert pq.read_table(done).num_rows == 20
