"""A reload into a config whose new plugin processor calls sys.exit() while it is made (a script turned into a
stage, exiting on options it dislikes): the SystemExit went through the reloader and ended `pipeline run` at once,
exit code 0, no summary, what the sinks had queued not written. A SIGHUP never ends the run: the reload is
rejected with one line and the running config stays.

Real parts: `pipeline run` in a subprocess, SIGHUP, SIGTERM, the summary on stderr.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.procs import pipeline_run, stop_process

PLUGIN = '''
import sys

from pipeline.api import Options, Processor


class Exits(Processor):
    name = "exits"
    Options = Options

    def __init__(self, options, context):
        super().__init__(options, context)
        sys.exit(0)

    def process(self, batch):
        return batch
'''


def config(tmp_path: Path, stages: str) -> str:
    return f"""name: x
source: {{type: "tests.slow_sink:TickSource", every: 0.01}}
stages:
{stages}  - {{type: filter, channels: [alert]}}
sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl, flush_interval: 0}}]
"""


def written(tmp_path: Path) -> int:
    out = tmp_path / "o.jsonl"
    return out.read_bytes().count(b"\n") if out.exists() else 0


def test_a_reload_whose_new_plugin_calls_sys_exit_is_rejected_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text(PLUGIN)
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, ""))
    log = tmp_path / "err.log"
    with log.open("w") as err:
        proc = pipeline_run(p, cwd=tmp_path, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while written(tmp_path) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        p.write_text(config(tmp_path, '  - {type: "exits:Exits"}\n'))
        proc.send_signal(signal.SIGHUP)
        while "reload (SIGHUP)" not in log.read_text():
            assert proc.poll() is None, f"the reload ended the run: {log.read_text()}"
            assert time.monotonic() < deadline + 10, log.read_text()
            time.sleep(0.02)
        before = written(tmp_path)
        while written(tmp_path) < before + 10:  # still running on the old config
            assert proc.poll() is None and time.monotonic() < deadline + 20, log.read_text()
            time.sleep(0.02)
    finally:
        code = stop_process(proc)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    line = next(ln for ln in text.splitlines() if "reload (SIGHUP)" in ln)
    assert ("reload (SIGHUP) rejected, the running config stays: stages[0]:exits:Exits: cannot start: "
            "called sys.exit(0)") in line, line
    assert "reloads: 0 applied, 1 rejected" in text, text
    read = next(ln.split() for ln in text.splitlines() if ln.startswith("  source:"))
    assert int(read[2]) == written(tmp_path), text  # every event read was written
