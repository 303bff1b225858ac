"""config/grafana and the README's metrics table: every metric the dashboard queries or the README names exists in
a real /metrics scrape of config/demo.yaml (emulator + real SDK + controller + rules), and the provisioning points
at the Prometheus service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import free_port
from tests.operator_harness import http_get

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "config/grafana/dashboards/videodb-pipeline.json"
METRIC = re.compile(r"\b((?:videodb_pipeline|process)_[a-z_]+)\b")


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][0]["definition"])
    return {m for e in exprs for m in METRIC.findall(e)}


def readme_metrics() -> set[str]:
    """The names in the README's metrics table (written in full: `_out_total` alone named nothing real)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Metrics"):text.index("### Tap")]
    assert not re.findall(r"`(_[a-z_]+)`", table), "a metric written as a suffix, not a name one can query"
    return set(re.findall(r"`(videodb_pipeline_[a-z_]+)`", table))


def test_every_dashboard_and_readme_metric_exists_in_a_real_scrape(tmp_path: Path) -> None:
    documented = readme_metrics()
    assert len(documented) >= 20
    wanted = dashboard_metrics()
    assert len(wanted) >= 15 and "videodb_pipeline_sink_latency_seconds_bucket" in wanted
    wanted |= documented
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEMO_SPEED": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "config/demo.yaml"), "--http",
                             f"127.0.0.1:{port}", "-q"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                status, _ = http_get(f"http://127.0.0.1:{port}/ready")
                _, text = http_get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                time.sleep(0.2)
                continue
            if status == 200 and 'videodb_pipeline_alerts_fired_total{' in text:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the demo never became ready with an alert fired")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    present: set[str] = set()
    for fam in text_string_to_metric_families(text):
        present |= {fam.name, fam.name + "_total"} | {s.name for s in fam.samples}
    missing = sorted(wanted - present)
    assert not missing, f"the dashboard or README names metrics /metrics does not have: {missing}"
    assert 'videodb_pipeline_capture_session_state{pipeline="demo",state="active"} 1.0' in text
    assert 'videodb_pipeline_websocket_connected{pipeline="demo"} 1.0' in text


def test_provisioning_matches_the_dashboard_and_compose() -> None:
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    source = yaml.safe_load((ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert uids == {ds["uid"] for ds in source["datasources"]} == {"prometheus"}
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((ROOT / "config/grafana/provisioning/dashboards/pipeline.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
