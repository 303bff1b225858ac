"""faust runtime end to end: `pipeline run` ingest + real `pipeline worker` processes on a real broker."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.faust_ingest import SessionKeys
from pipeline.runtime.local import LocalRuntime
from pipeline.session import SessionLink
from tests.broker import Broker, kafka_broker, read_records  # noqa: F401
from tests.procs import stop_process

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "config/samples/meeting-session.jsonl"
CLI = [sys.executable, "-m", "pipeline.cli"]
ASSIGNED = re.compile(r"worker (\d+): assigned ingest partitions \[([\d, ]*)\]")


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def canonical(events: list[dict[str, Any]]) -> list[bytes]:
    return sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events)


def alert_keys(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((a["data"]["event_label"], a.get("origin") or "", a.get("capture_session_id") or "",
                   a.get("rtstream_id") or "", a["data"]["timestamp"]) for a in events if a.get("channel") == "alert")


def multi_session(path: Path, copies: int) -> None:
    """The recorded session `copies` times over, as distinct sessions and rtstreams, interleaved line by line."""
    lines = SAMPLE.read_text().splitlines()
    active = next(orjson.loads(x) for x in lines if '"capture_session.active"' in x)
    sid = active["capture_session_id"]
    streams = [s["rtstream_id"] for s in active["data"]["rtstreams"]]
    per_copy = []
    for k in range(copies):
        out = []
        for line in lines:
            line = line.replace(sid, f"{sid}-{k}")
            for rts in streams:
                line = line.replace(f'"{rts}"', f'"{rts}-{k}"')
            out.append(line)
        per_copy.append(out)
    path.write_text("".join(f"{copy[i]}\n" for i in range(len(lines)) for copy in per_copy))


def write_config(path: Path, *, engine: str, bootstrap: str, out: Path, stages: list[Any], name: str) -> Path:
    cfg = {
        "name": name,
        "source": {"type": "replay", "path": "${REPLAY:-workers-do-not-read-it.jsonl}"},
        "stages": stages,
        "sinks": [{"type": "jsonl", "path": str(out / "events.jsonl")},
                  {"type": "jsonl", "path": str(out / "alerts.jsonl"), "channels": ["alert"]}],
        "runtime": {"engine": engine, "broker": f"kafka://{bootstrap}", "partitions": 4},
        "dead_letter": str(out / "dead-letter.jsonl"),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def window_config(tmp_path: Path, bootstrap: str, name: str, size: str) -> tuple[Path, dict[str, Any]]:
    """A faust config with enrich and a `window` stage of `size` (tables with a changelog), each record handed
    over at once (`batch_wait: 0s`); its path, and its document for changes the caller writes back."""
    path = write_config(tmp_path / "f.yaml", engine="faust", bootstrap=bootstrap, out=tmp_path / "out",
                        stages=[{"type": "enrich"}, {"type": "window", "size": size}], name=f"{name}{os.getpid()}")
    doc = yaml.safe_load(path.read_text())
    doc["runtime"]["batch_wait"] = "0s"
    path.write_text(yaml.safe_dump(doc))
    return path, doc


class Workers:
    """`pipeline worker` subprocesses, their logs, and a clean SIGTERM stop."""

    def __init__(self, cfg: Path, tmp: Path, env: dict[str, str]) -> None:
        self.cfg, self.tmp, self.env = cfg, tmp, env
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.stopped: set[int] = set()

    def start(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([*CLI, "worker", str(self.cfg), "--workers-dir", str(self.tmp / "workers"),
                                     "--session-timeout", "3s"], cwd=self.tmp, env=self.env,
                                    stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def assignments(self) -> dict[int, set[int]]:
        """Latest ingest partitions each live worker reported."""
        latest: dict[int, set[int]] = {}
        for proc, log in self.procs:
            if proc.poll() is None:
                for pid, parts in ASSIGNED.findall(log.read_text(errors="replace")):
                    latest[int(pid)] = {int(p) for p in parts.replace(" ", "").split(",") if p}
        return latest

    async def settled(self, n: int, timeout: float = 60) -> None:
        """Wait until `n` live workers own disjoint partitions covering all 4."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.assignments()
            parts = [p for ps in got.values() for p in ps]
            if len(got) == n and all(got.values()) and sorted(parts) == [0, 1, 2, 3]:
                return
            for proc, log in self.procs:
                if proc.pid not in self.stopped:
                    assert proc.poll() is None, f"worker exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.2)
        raise AssertionError(f"workers did not settle: {self.assignments()}")

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        self.stopped.add(proc.pid)
        return stop_process(proc)

    def stop_all(self) -> list[int]:
        return [self.stop(p) for p, _ in self.procs]


@pytest.fixture
def workers_env(kafka_broker: Broker) -> Iterator[dict[str, str]]:  # noqa: F811
    yield {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"}


async def ingest(cfg: Path, env: dict[str, str], replay: Path) -> None:
    proc = await asyncio.create_subprocess_exec(*CLI, "run", str(cfg), env={**env, "REPLAY": str(replay)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def local_reference(cfg: Path, replay: Path, monkeypatch: pytest.MonkeyPatch) -> LocalRuntime:
    monkeypatch.setenv("REPLAY", str(replay))
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    assert await rt.run() == 0
    return rt


async def wait_for_lines(path: Path, n: int, workers: Workers, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while count(path) < n and time.monotonic() < deadline:
        for proc, log in workers.procs:
            assert proc.poll() is None or proc.returncode == 0, log.read_text()[-3000:]
        await asyncio.sleep(0.2)
    assert count(path) >= n, f"{count(path)} of {n} events after {timeout}s"


async def produce(bootstrap: str, topic: str, partition: int, value: bytes) -> None:
    """One record straight onto a topic partition (no ingest)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


async def wait_for_markers(path: Path, n: int, workers: Workers, timeout: float = 30) -> None:
    """Wait until `n` events with a "marker" field (records a test put on a partition) are in `path`."""
    deadline = time.monotonic() + timeout
    while sum("marker" in e for e in read(path)) < n and time.monotonic() < deadline:
        for proc, log in workers.procs:
            assert proc.poll() is None or proc.returncode == 0, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert sum("marker" in e for e in read(path)) >= n, f"not {n} markers out after {timeout}s"


# --------------------------------------------------------------------------------------------

def test_ingest_keys_events_by_capture_session_once_known() -> None:
    session = SessionLink()
    keys = SessionKeys(session)
    assert keys({"channel": "transcript", "rtstream_id": "rts-1"}) == "rts-1"
    active = {"event": "capture_session.active", "capture_session_id": "cap-1",
              "data": {"rtstreams": [{"rtstream_id": "rts-1"}, {"rtstream_id": "rts-2"}]}}
    assert keys(active) == "cap-1"
    assert keys({"channel": "transcript", "rtstream_id": "rts-2"}) == "cap-1"
    assert keys({"channel": "transcript", "rtstream_id": "rts-9"}) == "rts-9"
    session.capture_session_id = "cap-2"  # what the controller knows
    assert keys({"channel": "transcript", "rtstream_id": "rts-9"}) == "cap-2"


async def test_ingest_and_two_workers_match_the_local_runtime(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    replay = tmp_path / "sessions.jsonl"
    multi_session(replay, copies=4)
    stages = yaml.safe_load((ROOT / "config/demo.yaml").read_text())["stages"]
    local_cfg = write_config(tmp_path / "local.yaml", engine="local", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "local", stages=stages, name="parity")
    faust_cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "faust", stages=stages, name="parity")
    rt = await local_reference(local_cfg, replay, monkeypatch)
    want_events = read(tmp_path / "local/events.jsonl")
    want_alerts = read(tmp_path / "local/alerts.jsonl")
    assert rt.b.chain.alerts_fired >= 8  # the sample fires rules in every copy

    workers = Workers(faust_cfg, tmp_path, workers_env)
    try:
        workers.start()
        workers.start()
        await workers.settled(2)
        await ingest(faust_cfg, workers_env, replay)
        await wait_for_lines(tmp_path / "faust/events.jsonl", len(want_events), workers)
        await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up now
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0]
    got_events = read(tmp_path / "faust/events.jsonl")
    assert canonical(got_events) == canonical(want_events)
    assert alert_keys(read(tmp_path / "faust/alerts.jsonl")) == alert_keys(want_alerts)
    both = [log.read_text() for _, log in workers.procs]
    assert all("sinks[0]:jsonl" in text for text in both)  # each worker ran the sinks and closed them
    assert not (tmp_path / "faust/dead-letter.jsonl").exists()


async def test_a_rebalance_commits_what_the_worker_processed_before_it(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """Before: faust forgot, at a rebalance, which records of the revoked partitions were acknowledged before
    it committed their offsets, so all a worker processed since its last periodic commit was processed again
    by the partitions' next owners (every event written twice here). The periodic commit is moved out of the
    test (BROKER_COMMIT_INTERVAL), so only the rebalance commits; a record through every partition after it,
    once out, means whatever would be processed again is out too."""
    replay = tmp_path / "sessions.jsonl"
    multi_session(replay, copies=4)
    events = sum(1 for line in replay.read_text().splitlines() if line.strip())
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "faust", stages=[{"type": "enrich"}], name="handback")
    out = tmp_path / "faust/events.jsonl"
    workers = Workers(cfg, tmp_path, {**workers_env, "BROKER_COMMIT_INTERVAL": "600"})
    try:
        workers.start()
        await workers.settled(1)
        await ingest(cfg, workers_env, replay)
        await wait_for_lines(out, events, workers)
        workers.start()
        await workers.settled(2)
        for partition in range(4):
            await produce(kafka_broker.bootstrap, "handback-ingest", partition,
                          orjson.dumps({"channel": "marker", "marker": partition}))
        await wait_for_markers(out, 4, workers)
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0]
    got = len(read(out))
    assert got == events + 4, f"{got - events - 4} events processed twice"


def event(t: int, text: str, channel: str = "visual_index") -> dict[str, Any]:
    return {"channel": channel, "rtstream_id": "rts-scr", "rtstream_name": "display:1",
            "data": {"text": text, "start": 1710000000000 + t * 1000, "end": 1710000000000 + t * 1000 + 500},
            "unix_ts": 1710000000 + t, "ts": "x"}


async def test_rule_state_moves_with_partitions_when_a_worker_leaves(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cooldown and window counts live in faust tables: the worker taking over a partition continues its state."""
    from aiokafka.partitioner import DefaultPartitioner

    active = {"event": "capture_session.active", "capture_session_id": "cap-r", "status": "active",
              "data": {"rtstreams": [{"rtstream_id": "rts-scr", "name": "display:1", "media_types": ["video"]}]},
              "unix_ts": 1710000000, "ts": "x"}
    first = [active, event(1, "VS Code with Python code"), event(2, "Slack is open")]
    second = [event(10, "more code in the editor"), event(20, "Slack again")]  # in cooldown / completes window
    part1, part2, whole = tmp_path / "part1.jsonl", tmp_path / "part2.jsonl", tmp_path / "whole.jsonl"
    for path, evs in ((part1, first), (part2, second), (whole, first + second)):
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in evs))
    stages = [{"type": "enrich"},
              {"type": "rules", "rules": [
                  {"name": "code", "channels": ["visual_index"], "keywords": ["code"], "cooldown": "60s"},
                  {"name": "chat", "channels": ["visual_index"], "keywords": ["slack"], "window": "10m",
                   "min_count": 2}]}]
    local_cfg = write_config(tmp_path / "local.yaml", engine="local", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "local", stages=stages, name="handover")
    faust_cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                             out=tmp_path / "faust", stages=stages, name="handover")
    await local_reference(local_cfg, whole, monkeypatch)
    want = alert_keys(read(tmp_path / "local/alerts.jsonl"))
    assert [k[0] for k in want] == ["chat", "code"]  # code once (cooldown), chat once the window has 2
    session_partition = DefaultPartitioner()(b"cap-r", [0, 1, 2, 3], [0, 1, 2, 3])

    workers = Workers(faust_cfg, tmp_path, workers_env)
    events = tmp_path / "faust/events.jsonl"
    try:
        workers.start()
        workers.start()
        await workers.settled(2)
        await ingest(faust_cfg, workers_env, part1)
        await wait_for_lines(events, 4, workers)  # 3 events + the code alert
        # the state written for the session went to the changelog partition of the session's events
        changelog = await read_records(kafka_broker.bootstrap, [
            "videodb-pipeline-handover-rules.last_fired-changelog",
            "videodb-pipeline-handover-enrich.rtstreams-changelog"], expect=2, timeout=10)
        assert len(changelog) == 2 and {r.partition for r in changelog} == {session_partition}
        owner = next(pid for pid, parts in workers.assignments().items() if session_partition in parts)
        assert workers.stop(next(p for p, _ in workers.procs if p.pid == owner)) == 0
        await workers.settled(1)  # the other worker now owns every partition, and the session's state
        await ingest(faust_cfg, workers_env, part2)
        await wait_for_lines(events, 7, workers)  # + 2 events + the chat alert
        await asyncio.sleep(0.5)
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0]
    assert alert_keys(read(tmp_path / "faust/alerts.jsonl")) == want
