"""SIGTERM while the replay skips a line over the limit in a huge file (a corrupt or sparse file with no newline).

Before: the rest of such a line was read and thrown away in one synchronous loop, so the event loop, and with
it SIGTERM, waited until the whole line had been read (a 1 TiB sparse file: minutes; the pipe path had been
fixed the same way before). Now the skip lets the loop run between its reads and stops when the run stops.

Real parts: `pipeline run` in a subprocess, a real sparse file, SIGTERM.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import pytest

from tests.faults.test_replay_pipe import EVENT, wait_for
from tests.procs import finish, pipeline_run


def read_bytes(pid: int) -> int:
    """Bytes the process has read so far (`rchar` of /proc/PID/io)."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in io.splitlines() if line.startswith("rchar:")))


@pytest.mark.parametrize("batch", ["batch_size: 1", "batch_size: 256"])
def test_sigterm_stops_a_replay_skipping_a_huge_line_within_its_bound(tmp_path: Path, batch: str) -> None:
    """(batch_size 256, the default: the batch holding the line's start was read whole first, 256 pieces of
    4 MiB, 8 s of a sparse file, before the skipping could let SIGTERM in.)"""
    src = tmp_path / "in.jsonl"
    with src.open("wb") as fh:
        fh.write(EVENT)
        fh.truncate(1 << 40)  # then 1 TiB of zero bytes and no newline (sparse: nothing on disk)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""name: huge
source: {{type: replay, path: {src}, {batch}}}
sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl, flush_interval: 0}}]
""")
    proc = pipeline_run(cfg, cwd=tmp_path)
    try:
        assert wait_for(lambda: read_bytes(proc.pid) > 64 << 20, 20), "the long line's skipping did not start"
    finally:
        proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = finish(proc, 8)
    took = time.monotonic() - started
    assert proc.returncode == 0 and took < 3, (proc.returncode, took, err[-800:])
    # every accepted event accounted for: the one before the long line written, the long line dead-lettered
    assert (tmp_path / "o.jsonl").read_bytes().count(b"\n") == 1, err
    dead = [orjson.loads(x) for x in (tmp_path / "out/huge/dead-letter.jsonl").read_bytes().splitlines()]
    assert [d["origin"]["line"] for d in dead] == [2] and "4 MiB limit" in dead[0]["reason"], dead
