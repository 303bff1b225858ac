"""The `window` stage on the faust runtime: state in tables, open windows flushed when a worker stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.test_faust_runtime import (
    SAMPLE,
    Workers,
    canonical,
    ingest,
    local_reference,
    read,
    wait_for_lines,
    workers_env,  # noqa: F401
    write_config,
)

pytestmark = pytest.mark.timeout(150)
STAGES = [{"type": "enrich"},
          {"type": "window", "size": "30s", "key": ["capture_session_id", "rtstream_id"], "allowed_lateness": "1h"}]


async def test_worker_flushes_the_same_windows_as_the_local_runtime(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    local_cfg = write_config(tmp_path / "local.yaml", engine="local", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "local", stages=STAGES, name="win")
    faust_cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "faust", stages=STAGES, name="win")
    await local_reference(local_cfg, SAMPLE, monkeypatch)
    want = [e for e in read(tmp_path / "local/events.jsonl") if e.get("channel") == "metrics"]
    assert len(want) >= 6  # a 30 s window never closes before the end (1h lateness): all come from the flush
    events = sum(1 for line in SAMPLE.read_text().splitlines() if line.strip())
    workers = Workers(faust_cfg, tmp_path, workers_env)
    try:
        workers.start()
        await workers.settled(1)
        await ingest(faust_cfg, workers_env, SAMPLE)
        await wait_for_lines(tmp_path / "faust/events.jsonl", events, workers)
        assert not [e for e in read(tmp_path / "faust/events.jsonl") if e.get("channel") == "metrics"]
    finally:
        codes = workers.stop_all()  # SIGTERM: the worker closes its open windows before its sinks
    assert codes == [0]
    got = [e for e in read(tmp_path / "faust/events.jsonl") if e.get("channel") == "metrics"]
    assert canonical(got) == canonical(want)
