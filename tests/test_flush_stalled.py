"""A sink whose flush never returns, flushed by the runtime once a second (to forget a closed window's kept
`metrics`, as before a kafka commit): the run said nothing of it, and no view showed it (the sink had no batch
in it, so `writing_for` stayed empty), while commits and the forgetting of kept windows stopped. Now the log says
so once after `drain_timeout`, and /api/status (the status page, `pipeline top`, the status line) says
`flushing_for`."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.broker import free_port
from tests.procs import finish, pipeline_run, stop_process
from tests.test_window_kill import SOURCE, write_config

SINK = '''
import asyncio
from pipeline.api import Options, Sink


class HangOptions(Options):
    pass


class Hang(Sink):
    """Takes every batch; its flush never returns."""

    name = "hang"
    Options = HangOptions

    async def write(self, batch):
        pass

    async def flush(self):
        await asyncio.Event().wait()
'''


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as r:
        return dict(json.loads(r.read()))


def test_a_flush_that_hangs_is_said_and_shown(tmp_path: Path) -> None:
    (tmp_path / "lines_src.py").write_text(SOURCE)
    (tmp_path / "hang_sink.py").write_text(SINK)
    cfg = write_config(tmp_path, range(0, 100), hold=True)  # window [0, 60 s) closes: the sinks get flushed
    port = free_port()
    cfg.write_text(cfg.read_text().replace("dead_letter:", "  - {type: 'hang_sink:Hang'}\n"
                                           f"runtime: {{drain_timeout: 1s, http: '127.0.0.1:{port}'}}\n"
                                           "dead_letter:"))
    proc = pipeline_run(cfg, cwd=tmp_path, plugins=True)
    shown: float | None = None
    try:
        deadline = time.monotonic() + 40
        while shown is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                sinks = status(port)["sinks"]
            except OSError:
                continue
            shown = sinks[1].get("flushing_for")
            assert sinks[0].get("flushing_for") is None, sinks
    finally:
        stop_process(proc)
    _, err = finish(proc, 30)
    assert shown is not None and shown >= 5, err
    assert err.count("sinks[1]:hang_sink:Hang: flush has not returned for 1s") == 1, err
    assert proc.returncode == 0, err  # (its close returns: what it took counts as written)
