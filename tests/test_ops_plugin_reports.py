"""A plugin's `report()` (its extra counters) is read by the exit summary, /metrics and the status page: one
that raises or returns what is not a count costs its counters, never the summary or a scrape. A real
`pipeline run` with a plugin module beside its config."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.broker import free_port
from tests.operator_harness import replay_file
from tests.procs import finish, pipeline_run, stop_process

PLUGIN = '''
from pipeline.api import Processor, Sink


class BrokenReport(Sink):
    async def write(self, batch):
        pass

    def report(self):
        raise RuntimeError("report broke")


class OddReport(Processor):
    def process(self, batch):
        return batch

    def report(self):
        return {"mood": "sunny", "seen": 3}
'''


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_plugin_report_that_raises_or_is_not_counts_costs_only_its_counters(tmp_path: Path) -> None:
    (tmp_path / "reports.py").write_text(PLUGIN)
    replay_file(tmp_path / "in.jsonl", 40, step=0.05)  # 2 s at speed 1
    (tmp_path / "p.yaml").write_text("""name: rep
source: {type: replay, path: in.jsonl, speed: 1}
stages: [{type: "reports:OddReport"}]
sinks: [{type: "reports:BrokenReport"}, {type: jsonl, path: out.jsonl}]
runtime: {status_interval: 0}
""")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = pipeline_run("p.yaml", "--http", f"127.0.0.1:{port}", "--summary-json", "summary.json", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if get(base + "/ready") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert get(base + "/metrics") == 200
        assert get(base + "/api/status") == 200
        _, err = finish(proc, 30)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.count("report broke") == 1, err
    assert "sinks[1]:jsonl               written     40" in err
    assert "seen 3" in err and "sunny" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["stages"][1]["seen"] == 3
