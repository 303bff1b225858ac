"""`pipeline worker --http`: a faust worker's /metrics and /ready, scraped while it processes the ingest topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import Broker, free_port, kafka_broker
from tests.operator_harness import http_get
from tests.test_faust_runtime import (
    CLI,
    ROOT,
    SAMPLE,
    Workers,
    count,
    ingest,
    wait_for_lines,
    workers_env,
    write_config,
)

pytestmark = pytest.mark.timeout(150)
__all__ = ["kafka_broker", "workers_env"]


async def http_worker(cfg: Path, tmp_path: Path, env: dict[str, str]) -> tuple[Workers, subprocess.Popen[bytes], str]:
    """A `pipeline worker --http` on a free port, once its /ready says 200: (its Workers, the process, base URL)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    workers = Workers(cfg, tmp_path, env)
    proc = subprocess.Popen([*CLI, "worker", str(cfg), "--workers-dir", str(tmp_path / "w"),
                             "--session-timeout", "3s", "--http", f"127.0.0.1:{port}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers.procs.append((proc, tmp_path / "none.log"))
    (tmp_path / "none.log").write_text("")
    deadline = time.monotonic() + 60
    status, body = 0, ""
    while time.monotonic() < deadline:
        try:
            status, body = http_get(base + "/ready")
        except OSError:
            await asyncio.sleep(0.2)
            continue
        if status == 200:
            break
        await asyncio.sleep(0.2)
    if status != 200:
        workers.stop(proc)
    assert status == 200, body
    return workers, proc, base


async def test_worker_serves_metrics_and_ready(kafka_broker: Broker, workers_env: dict[str, str],
                                               tmp_path: Path) -> None:
    stages = yaml.safe_load((ROOT / "config/demo.yaml").read_text())["stages"]
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "out", stages=stages, name="wm")
    workers, proc, base = await http_worker(cfg, tmp_path, workers_env)
    try:
        await ingest(cfg, workers_env, SAMPLE)
        want = sum(1 for _ in SAMPLE.open())
        await wait_for_lines(tmp_path / "out/events.jsonl", 1, workers)
        await asyncio.sleep(2.0)
        written = count(tmp_path / "out/events.jsonl")
        status, text = http_get(base + "/metrics")
        assert status == 200
        samples = {(s.name, s.labels.get("sink", ""), s.labels.get("stage", "")): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("videodb_pipeline_info", "", "")] == 1
        assert samples[("videodb_pipeline_sink_events_written_total", "sinks[0]:jsonl", "")] == written
        assert 0 < samples[("videodb_pipeline_stage_events_in_total", "", "stages[0]:filter")] <= want
        assert not any(name.startswith("videodb_pipeline_websocket") for name, _, _ in samples)
        # before: no sink latency, no event lag and no VideoDB alerts from a worker (its dashboard panels empty)
        assert samples[("videodb_pipeline_sink_latency_seconds_count", "sinks[0]:jsonl", "")] == written
        assert samples[("videodb_pipeline_event_lag_seconds_count", "", "")] == want
        assert samples[("videodb_pipeline_videodb_alerts_total", "", "")] == sum(
            1 for line in SAMPLE.open() if '"channel": "alert"' in line) > 0
    finally:
        assert workers.stop(proc) == 0


async def test_a_worker_says_a_batch_is_stuck_in_a_sink(kafka_broker: Broker, workers_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    """A worker's /api/status showed a sink stuck on a batch (a webhook that never answers) as idle: no
    `writing_for`, and no latency at all. It now says how long the batch has been in the sink, as a local run's
    does, and the latency once it is written."""
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "out", stages=[], name="ws")
    doc = yaml.safe_load(cfg.read_text())
    gated = str(tmp_path / "gated.txt")
    doc["sinks"][0] = {"type": "tests.slow_sink:GatedSink", "path": gated, "delay": 0}
    cfg.write_text(yaml.safe_dump(doc))
    Path(gated + ".hold").write_text("")
    workers, proc, base = await http_worker(cfg, tmp_path, workers_env)
    try:
        await ingest(cfg, workers_env, SAMPLE)
        deadline = time.monotonic() + 30
        sink: dict[str, Any] = {}
        while time.monotonic() < deadline:
            sink = orjson.loads(http_get(base + "/api/status")[1])["sinks"][0]
            if sink["writing_for"] is not None:
                break
            await asyncio.sleep(0.2)
        assert sink["writing_for"] >= 5 and sink["latency"] is None, sink
        os.unlink(gated + ".hold")
        while time.monotonic() < deadline:
            sink = orjson.loads(http_get(base + "/api/status")[1])["sinks"][0]
            if sink["latency"] is not None:
                break
            await asyncio.sleep(0.2)
        assert sink["writing_for"] is None and sink["latency"] >= 5, sink
    finally:
        Path(gated + ".hold").unlink(missing_ok=True)
        assert workers.stop(proc) == 0


def test_worker_logs_in_the_chosen_format_all_the_way(kafka_broker: Broker, workers_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    """`pipeline worker CONFIG --log-format json` (the pre-parser takes it before or after the subcommand) wrote
    its first line as JSON and every later one, its own included, in faust's `[date] [pid] [INFO]` text once
    faust set up logging."""
    import json

    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "out", stages=[], name="wlog")
    args = [*CLI, "worker", str(cfg), "--log-format", "json"]
    log = tmp_path / "worker.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*args, "--workers-dir", str(tmp_path / "w"), "--session-timeout", "3s"],
                                cwd=tmp_path, env=workers_env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while "assigned ingest partitions" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    assert any("stages" in x or "sinks[0]:jsonl" in x for x in lines)  # the worker's exit lines are there
    for line in lines:
        record = json.loads(line)  # every line, faust's too
        assert {"time", "level", "logger", "message"} <= set(record), line
