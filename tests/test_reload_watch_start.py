"""`pipeline run --watch`: a save made while the run starts (its config read, its stages still being built) is
reloaded. The watcher took the file's first digest only once the pipeline was built: a save in between was taken
as the running config, never reloaded, and the run went on with the old rules until the next save.

Real parts: `pipeline run --watch` in a subprocess, a plugin processor whose constructor waits for the test.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import pipeline_run, stop_process

PLUGIN = '''
import os
import time

from pipeline.api import Options, Processor


class SlowBuildOptions(Options):
    gate: str


class SlowBuild(Processor):
    """Its constructor says it runs, then waits for the file `gate` (a stage that takes a while to build)."""

    name = "slow_build"
    Options = SlowBuildOptions

    def __init__(self, options, context):
        super().__init__(options, context)
        open(options.gate + ".building", "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(options.gate) and time.monotonic() < deadline:
            time.sleep(0.01)

    def process(self, batch):
        return batch
'''


def config(tmp_path: Path, rules: str) -> str:  # a source that keeps retrying a closed port: the run waits
    return f"""name: w
source: {{type: websocket, url: 'ws://127.0.0.1:9', backoff_initial: 1s}}
stages:
  - {{type: "slow_build:SlowBuild", gate: {tmp_path}/gate}}
  - {{type: rules, rules: [{rules}]}}
sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl}}]
"""


def wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_save_while_the_run_starts_is_reloaded(tmp_path: Path) -> None:
    (tmp_path / "slow_build.py").write_text(PLUGIN)
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, "{name: apple, keywords: [apple]}"))
    log = tmp_path / "err.log"
    with log.open("w") as err:
        proc = pipeline_run(p, "--watch", cwd=tmp_path, stderr=err)
    try:
        wait_for((tmp_path / "gate.building").exists, "the stages being built", proc)
        p.write_text(config(tmp_path, "{name: apple, keywords: [apple]}, {name: pie, keywords: [pie]}"))
        (tmp_path / "gate").touch()
        wait_for(lambda: "reload (" in log.read_text(), "the save to be reloaded (watch: once a second)", proc, 5)
    finally:
        code = stop_process(proc)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    assert f"reload ({p} changed) applied: 2 processor(s)" in text, text
    assert "reloads: 1 applied, 0 rejected" in text, text
