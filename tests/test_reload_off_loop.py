"""A reload reads and validates the config file off the event loop.

A config of thousands of keywords or regexes takes a second or more to read and validate, and the reload did it
on the event loop: the HTTP server (/metrics, /api/status, the status page), the source's connection and the
sinks were held meanwhile (90,000 keywords: /api/status did not answer for 2.8 s). Here a plugin's options
check holds validation until the test lets it go: /api/status must answer meanwhile.

Real parts: `pipeline run` in a subprocess with --http, SIGHUP, SIGTERM, HTTP requests.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

from tests.broker import free_port
from tests.procs import pipeline_run, stop_process
from tests.test_reload_plugin_exit import config
from tests.test_reload_watch_start import wait_for

PLUGIN = '''
import os
import time

from pydantic import model_validator

from pipeline.api import Options, Processor


class HeldOptions(Options):
    hold: str

    @model_validator(mode="after")
    def _wait(self):
        open(self.hold + ".entered", "w").close()
        deadline = time.monotonic() + 10
        while os.path.exists(self.hold) and time.monotonic() < deadline:  # a long validation
            time.sleep(0.01)
        return self


class Held(Processor):
    name = "held"
    Options = HeldOptions

    def process(self, batch):
        return batch
'''



def test_the_http_server_answers_while_a_reload_validates_the_file(tmp_path: Path) -> None:
    (tmp_path / "held.py").write_text(PLUGIN)
    hold = tmp_path / "hold"
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, ""))
    port = free_port()
    log = tmp_path / "err.log"
    with log.open("w") as err:
        proc = pipeline_run(p, "--http", f"127.0.0.1:{port}", cwd=tmp_path, stderr=err)
    try:
        status = f"http://127.0.0.1:{port}/api/status"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(status, timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(answers, "the HTTP server", proc)
        hold.touch()
        p.write_text(config(tmp_path, f'  - {{type: "held:Held", hold: "{hold}"}}\n'))
        proc.send_signal(signal.SIGHUP)
        wait_for(Path(f"{hold}.entered").exists, "the reload to validate the file", proc)
        started = time.monotonic()
        with urllib.request.urlopen(status, timeout=5) as r:  # the loop was held until the validation ended
            assert r.status == 200
        assert time.monotonic() - started < 2, "the event loop was held while the config was validated"
        assert hold.exists() and "reload (SIGHUP)" not in log.read_text()  # (it was still validating)
        hold.unlink()
        wait_for(lambda: "reload (SIGHUP) applied: 2 processor(s)" in log.read_text(), "the reload", proc)
    finally:
        hold.unlink(missing_ok=True)
        code = stop_process(proc)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    assert "reloads: 1 applied, 0 rejected" in text, text
