"""Attacks on the distributed runtime: broker addresses a user can mistype, state after a worker dies mid-batch.

Real `pipeline` processes, the real test broker, real SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.kafka import ensure_topics
from tests.broker import Broker, kafka_broker, read_records  # noqa: F401
from tests.procs import communicate
from tests.test_faust_runtime import Workers, workers_env  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "pipeline.cli"]

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- a mistyped broker address: one line, exit 2, from every command ----------------------------------

def faust_config(path: Path, broker: str) -> Path:
    path.write_text(f"""name: t
source: {{type: replay, path: in.jsonl}}
sinks: [{{type: console}}]
runtime: {{engine: faust, broker: "{broker}", partitions: 4}}
""")
    return path


@pytest.mark.parametrize(("broker", "why"), [
    ("kafka://", "expected host:port"),
    ("kafka://localhost:notaport", "the port must be a number"),
    ("http://localhost:9092", "expected host:port (or kafka://host:port)"),
    ("localhost:99999", "the port must be a number"),
    ("kafka://a:9092;::1", "[::1]:9092 for IPv6"),
])
def test_a_malformed_runtime_broker_is_a_config_error(tmp_path: Path, broker: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"p\.yaml:4:\d+: runtime\.broker: .*" + re.escape(why)):
        load_config(faust_config(tmp_path / "p.yaml", broker))


@pytest.mark.parametrize(("value", "why"), [("0", "expected a number >= 1, got 0"),
                                            ("100000", "expected a number <= 1024, got 100000")])
def test_partitions_out_of_range_is_a_config_error(tmp_path: Path, value: str, why: str) -> None:
    """Before: 100000 was taken: the test broker grew by 400 MB creating the topic and a worker was still
    not assigned its partitions 17 s later."""
    path = faust_config(tmp_path / "p.yaml", "127.0.0.1:9")
    path.write_text(path.read_text().replace("partitions: 4", f"partitions: {value}"))
    with pytest.raises(ConfigError, match=r"runtime\.partitions: " + re.escape(why)):
        load_config(path)


@pytest.mark.parametrize(("command", "broker"), [
    ("run", "kafka://"),                        # was a pydantic traceback
    ("worker", "kafka://localhost:notaport"),   # was retried forever ("cannot reach ... (ValueError)")
    ("validate", "http://localhost:9092"),      # was "ok"; the worker then failed inside faust
])
def test_a_malformed_runtime_broker_is_one_line_exit_2_from_the_cli(tmp_path: Path, command: str,
                                                                     broker: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript"}\n')
    res = cli(command, str(faust_config(tmp_path / "p.yaml", broker).name), cwd=tmp_path, timeout=20)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: p.yaml:4:") and "runtime.broker" in lines[0], lines


@pytest.mark.parametrize("timeout", ["0", "1h"])
def test_a_worker_session_timeout_out_of_range_is_one_line_exit_2(tmp_path: Path, timeout: str) -> None:
    """Before: `0` joined the group and hung there ("Task timed out!"); `1h` was faust's ImproperlyConfigured
    traceback (over its 90 s request timeout). Checked before any broker is asked (port 9 has none)."""
    res = cli("worker", str(faust_config(tmp_path / "p.yaml", "127.0.0.1:9")), "--session-timeout", timeout,
              cwd=tmp_path, timeout=20)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"pipeline: --session-timeout: expected 1s to 90s, got {timeout!r} (how long a silent worker keeps "
        "its partitions)"]


@pytest.mark.parametrize("wait", ["0", "1h"])
def test_kafka_source_batch_wait_out_of_range_is_a_config_error(tmp_path: Path, wait: str) -> None:
    """Before: `batch_wait: 0` made every poll return at once without yielding: 100% CPU, and SIGTERM was
    never handled (the run was still there 11 minutes later); `1h` delayed a stop by up to an hour."""
    (tmp_path / "p.yaml").write_text(f"""name: t
source: {{type: kafka, bootstrap_servers: "127.0.0.1:9", topic: t, group: g, batch_wait: {wait}}}
sinks: [{{type: console}}]
""")
    with pytest.raises(ConfigError, match=r"p\.yaml:2:\d+: source\.batch_wait: "):
        load_config(tmp_path / "p.yaml")


def test_a_kafka_sink_or_source_address_with_a_bad_port_is_a_config_error(tmp_path: Path) -> None:
    """Was accepted by validate, then a ValueError at the first connect (`invalid literal for int()`)."""
    (tmp_path / "p.yaml").write_text("""name: t
source: {type: kafka, bootstrap_servers: "localhost:9092,localhost:90x2", topic: t, group: g}
sinks: [{type: kafka, bootstrap_servers: ["localhost:9092", "localhost:"]}]
""")
    res = cli("validate", "p.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "source.bootstrap_servers" in res.stderr and "'localhost:90x2'" in res.stderr, res.stderr



@pytest.mark.parametrize("key", ["[rtstream_name]", "[channel, rtstream_name]"])
def test_a_window_keyed_across_capture_sessions_is_refused_under_faust(tmp_path: Path, key: str) -> None:
    """Before: accepted, and every worker owning a partition with events of the key emitted its own partial
    `metrics` event for the same key and window (8 sessions, 2 workers, key [rtstream_name]: 24 metrics of
    half the counts each, the local runtime 12), since the ingest partitions events by capture session.
    The same stage under engine: local, or with the session in its key, is fine."""
    (tmp_path / "in.jsonl").write_text("")
    doc = f"""name: t
source: {{type: replay, path: in.jsonl}}
stages:
  - type: enrich
  - type: window
    size: 30s
    key: {key}
sinks: [{{type: console}}]
runtime: {{engine: ENGINE, broker: "127.0.0.1:9"}}
"""
    (tmp_path / "p.yaml").write_text(doc.replace("ENGINE", "faust"))
    res = cli("validate", "p.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"pipeline: p.yaml:7:5: stages[1].key: {yaml.safe_load(key)!r} groups events of several capture sessions, "
        "which engine: faust spreads over partitions and workers (each would emit its own partial metrics for a "
        "window); expected a key with capture_session_id or rtstream_id, e.g. [capture_session_id, "
        f"{yaml.safe_load(key)[0]}], or engine: local"]
    for ok in (doc.replace("ENGINE", "local"),
               doc.replace("ENGINE", "faust").replace(key, key.replace("[", "[rtstream_id, ")),
               doc.replace("ENGINE", "faust").replace(f"    key: {key}\n", "")):  # default: capture_session_id
        (tmp_path / "p.yaml").write_text(ok)
        res = cli("validate", "p.yaml", cwd=tmp_path)
        assert res.returncode == 0, res.stderr


def test_a_window_disabled_through_a_variable_is_not_refused_under_faust(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`enabled: "${WINDOW_ON:-false}"` (quoted, as a flow mapping needs) disables the stage like `enabled: false`,
    but the faust key check read the raw text "false", took the stage as enabled and refused its key."""
    monkeypatch.delenv("WINDOW_ON", raising=False)
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "p.yaml").write_text("""name: t
source: {type: replay, path: in.jsonl}
stages:
  - {type: window, size: 30s, key: [rtstream_name], enabled: "${WINDOW_ON:-false}"}
sinks: [{type: console}]
runtime: {engine: faust, broker: "127.0.0.1:9"}
""")
    assert [s.type_name for s in load_config(tmp_path / "p.yaml").disabled] == ["window"]
    monkeypatch.setenv("WINDOW_ON", "true")
    with pytest.raises(ConfigError, match=r"p\.yaml:4:\d+: stages\[0\]\.key: \['rtstream_name'\] groups events"):
        load_config(tmp_path / "p.yaml")


# -- helpers for the worker tests --------------------------------------------------------------------

def gated_config(tmp_path: Path, broker: Broker, name: str, lines: Path, batch_wait: str = "0s") -> Path:
    """A worker config: one cooldown rule, the GatedLines sink (holds batches while `<lines>.hold` exists)."""
    lines.parent.mkdir(exist_ok=True)
    cfg = tmp_path / "faust.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": name, "source": {"type": "replay", "path": "unused.jsonl"},
        "stages": [{"type": "rules", "rules": [{"name": "code", "channels": ["visual_index"],
                                                "keywords": ["code"], "cooldown": "60s"}]}],
        "sinks": [{"type": "tests.slow_sink:GatedLines", "path": str(lines), "delay": 0}],
        "runtime": {"engine": "faust", "broker": f"kafka://{broker.bootstrap}", "partitions": 4,
                    "drain_timeout": "1s", "batch_wait": batch_wait},
        "dead_letter": str(tmp_path / "out/dead-letter.jsonl")}))
    return cfg


async def run_worker(cfg: Path, cwd: Path, timeout: float = 40) -> tuple[int | None, str]:
    """(exit code, output) of `pipeline worker cfg` run until it exits by itself (killed after `timeout`)."""
    proc = await asyncio.create_subprocess_exec(*CLI, "worker", str(cfg), "--session-timeout", "3s", cwd=cwd,
                                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await communicate(proc, timeout)
    return proc.returncode, out.decode()


async def produce(broker: Broker, name: str, events: list[dict[str, object]]) -> None:
    """Events straight onto `<name>-ingest`, one record each, keyed by session."""
    from aiokafka import AIOKafkaProducer

    await ensure_topics([broker.bootstrap], [f"{name}-ingest"], 4, 1, logging.getLogger("test"), "test")
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for event in events:
            key = str(event["capture_session_id"]).encode()
            await producer.send_and_wait(f"{name}-ingest", orjson.dumps(event), key=key)
    finally:
        await producer.stop()


async def wait_for_file(path: Path, proc: subprocess.Popen[bytes], workers: Workers, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        assert proc.poll() is None, workers.procs[-1][1].read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert path.exists(), f"no {path.name} after {timeout}s"


# -- an ingest topic made with another partition count -----------------------------------------------

async def test_a_worker_refuses_an_ingest_topic_with_more_partitions_than_configured(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: the worker ran until a record from partition 4+ wrote rule state, then faust crashed
    ("AssertionError: Unrecognized partition": the changelog has `partitions` partitions) with a
    traceback, after part of the backlog."""
    name = f"parts{os.getpid()}"
    await ensure_topics([kafka_broker.bootstrap], [f"{name}-ingest"], 8, 1, logging.getLogger("test"), "test")
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    proc = await asyncio.create_subprocess_exec(*CLI, "worker", str(cfg), cwd=tmp_path,
                                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the worker started on a topic its state cannot follow") from None
    assert proc.returncode == 2, err.decode()[-2000:]
    assert err.decode().strip().splitlines() == [
        f"pipeline: {cfg}: runtime.partitions: 4, but topic {name}-ingest has 8 partitions (made by an earlier "
        "run); set partitions: 8, or give the pipeline a new name to start over with new topics"]



async def test_the_ingest_refuses_an_ingest_topic_with_another_partition_count(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: only the workers refused it; the ingest ran and spread the meeting over 8 partitions that no
    worker would ever read, and `pipeline run` said nothing."""
    name = f"iparts{os.getpid()}"
    await ensure_topics([kafka_broker.bootstrap], [f"{name}-ingest"], 8, 1, logging.getLogger("test"), "test")
    (tmp_path / "in.jsonl").write_bytes(b'{"channel": "transcript", "data": {"text": "hi"}}\n')
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    cfg.write_text(cfg.read_text().replace("unused.jsonl", str(tmp_path / "in.jsonl")))
    done = await asyncio.to_thread(cli, "run", str(cfg), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "read         0" in done.stderr
    assert (f"pipeline: {cfg}: runtime.partitions: 4, but topic {name}-ingest has 8 partitions (made by an earlier "
            "run); set partitions: 8, or give the pipeline a new name to start over with new topics"
            ) in done.stderr.splitlines()

# -- rule state and a worker killed mid-batch ---------------------------------------------------------

async def test_a_worker_killed_before_its_sinks_flushed_leaves_no_cooldown_behind(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The alert of a batch that no sink took must fire again when the batch is processed again.

    Before: the rule's cooldown went to the changelog while the batch was still at the sinks; after
    kill -9 the next worker restored it, processed the batch again and found the rule cooling down:
    the event was delivered, its alert never was (0 alerts of 1).
    """
    name = f"statekill{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    cfg = gated_config(tmp_path, kafka_broker, name, lines)
    await produce(kafka_broker, name, [{"channel": "visual_index", "capture_session_id": "cap-k",
                                        "rtstream_id": "rts-k",
                                        "data": {"text": "VS Code with Python code", "start": 1710000001000}}])
    hold = Path(f"{lines}.hold")
    hold.touch()  # the sink takes nothing until the file goes: the worker is mid-batch
    workers = Workers(cfg, tmp_path, workers_env)
    try:
        first = workers.start()
        await wait_for_file(Path(f"{lines}.waiting"), first, workers)
        # what the first worker leaves in the changelog by now is what the next one restores (before: 1 record)
        changelog = await read_records(kafka_broker.bootstrap, [
            f"videodb-pipeline-{name}-rules.last_fired-changelog"], expect=1, timeout=1.5)
        workers.stopped.add(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
        hold.unlink()
        workers.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not lines.exists():
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # the alert is written with its event, in the same batch
    finally:
        workers.stop_all()
    got = [orjson.loads(x) for x in lines.read_bytes().splitlines()] if lines.exists() else []
    assert [e["channel"] for e in got] == ["visual_index", "alert"], (got, changelog)
    assert changelog == []  # nothing reached the changelog while the batch was still at the sink


def test_staged_state_shows_the_batch_its_own_writes_and_keeps_them_from_the_table_until_commit() -> None:
    from pipeline.runtime.faust_state import StagedTable

    table = {"a": 1, "b": 2}
    staged = StagedTable(table)
    staged["c"] = 3
    del staged["a"]
    staged["b"] = 20
    assert table == {"a": 1, "b": 2}  # nothing reached the table (the changelog) yet
    assert dict(staged) == {"b": 20, "c": 3} and len(staged) == 2
    assert "a" not in staged and staged.get("a", "x") == "x" and staged.pop("c") == 3
    with pytest.raises(KeyError):
        del staged["a"]
    staged.discard()
    assert dict(staged) == {"a": 1, "b": 2}
    staged["d"] = 4
    del staged["b"]
    staged.commit()
    assert table == {"a": 1, "d": 4} and staged.changed == {}


# -- SIGTERM while a sink holds a batch ---------------------------------------------------------------

@pytest.mark.parametrize("batch_wait", ["0s", "1s"])
async def test_sigterm_stops_a_worker_whose_sink_stalls_within_drain_timeout_and_loses_nothing(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path, batch_wait: str) -> None:  # noqa: F811
    """Before: faust waited for the stalled batch without end ("wait_empty: Waiting for tasks", still there
    after 60 s). Now the batch is given up after drain_timeout, unacknowledged: the next worker delivers it.

    batch_wait 1s: before, faust's take_events acknowledged the given-up batch as the worker stopped, its
    offset was committed, and the next worker never delivered it (nothing written in 40 s)."""
    name = f"stall{batch_wait}{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    cfg = gated_config(tmp_path, kafka_broker, name, lines, batch_wait)
    await produce(kafka_broker, name, [{"channel": "visual_index", "capture_session_id": "cap-s",
                                        "rtstream_id": "rts-s", "data": {"text": "code", "start": 1000}}])
    hold = Path(f"{lines}.hold")
    hold.touch()
    workers = Workers(cfg, tmp_path, workers_env)
    try:
        first = workers.start()
        await wait_for_file(Path(f"{lines}.waiting"), first, workers)
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        workers.stopped.add(first.pid)
        try:
            code = await asyncio.wait_for(asyncio.to_thread(first.wait), 15)
        except TimeoutError:
            first.kill()
            raise AssertionError("the worker did not stop within 15 s of SIGTERM") from None
        took = time.monotonic() - started
        log = workers.procs[0][1].read_text()
        hold.unlink()
        workers.start()  # the batch was not acknowledged: the next worker delivers it
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not lines.exists():
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
    finally:
        workers.stop_all()
    assert code == 0 and took < 1 + 2 + 3, (code, took, log[-3000:])  # drain_timeout 1s, then close
    assert "after drain_timeout=1s" in log
    got = [orjson.loads(x) for x in lines.read_bytes().splitlines()] if lines.exists() else []
    assert [e["channel"] for e in got] == ["visual_index", "alert"], got


async def test_a_sink_that_fails_stops_the_worker_with_one_line_and_no_traceback(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: faust logged the StageError's traceback ("Crashed reason=...", then 12 lines of frames)
    above the one-line error."""
    name = f"failing{os.getpid()}"
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    doc = yaml.safe_load(cfg.read_text())
    doc["sinks"] = [{"type": "tests.slow_sink:FailingSink"}]
    cfg.write_text(yaml.safe_dump(doc))
    await produce(kafka_broker, name, [{"channel": "transcript", "capture_session_id": "cap-f", "seq": 1}])
    code, text = await run_worker(cfg, tmp_path)
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1] == (
        "pipeline: sinks[0]:tests.slow_sink:FailingSink: /fake/path: cannot write: No space left on device"
    ), text[-3000:]
    dead = [orjson.loads(x) for x in (tmp_path / "out/dead-letter.jsonl").read_bytes().splitlines()]
    assert [d["event"]["seq"] for d in dead] == [1] and dead[0]["reason"] == "sink failed before writing"


# -- events that name topics ------------------------------------------------------------------------

async def test_the_batch_a_sink_failed_is_delivered_by_the_next_worker(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A worker whose sink fails stops (exit 1) without acknowledging the batch, so the next worker, here with
    a sink that works, delivers it (batch_wait 1s; with the default 0s it did already). Before, with 1s,
    faust's take_events acknowledged the failed batch as the worker stopped, and the next worker never saw
    it (nothing written in 30 s)."""
    name = f"refail{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    good = gated_config(tmp_path, kafka_broker, name, lines, "1s")
    doc = yaml.safe_load(good.read_text())
    doc["sinks"] = [{"type": "tests.slow_sink:FailingSink"}]
    failing = tmp_path / "failing.yaml"
    failing.write_text(yaml.safe_dump(doc))
    await produce(kafka_broker, name, [{"channel": "transcript", "capture_session_id": "cap-f", "seq": 1}])
    workers = Workers(failing, tmp_path, workers_env)
    try:
        first = workers.start()
        workers.stopped.add(first.pid)
        assert await asyncio.wait_for(asyncio.to_thread(first.wait), 40) == 1, workers.procs[0][1].read_text()[-3000:]
        workers.cfg = good
        await wait_for_file(lines, workers.start(), workers)
    finally:
        codes = workers.stop_all()
    assert codes[1] == 0
    assert [e["seq"] for e in (orjson.loads(x) for x in lines.read_bytes().splitlines())] == [1]


async def test_events_cannot_make_the_kafka_sink_create_topics_without_end(
        kafka_broker: Broker, make_context: Any) -> None:  # noqa: F811
    """Before: 300 events with 300 channel names made 300 topics (x 4 partitions) on the broker, one
    create per new name, in 25 s. Now the sink sends to at most `max_topics` distinct topics; events for
    any other are dead-lettered with the reason."""
    from aiokafka.admin import AIOKafkaAdminClient

    from stages.sinks.kafka import KafkaSink, KafkaSinkOptions

    prefix = f"flood{os.getpid()}"
    options = KafkaSinkOptions(bootstrap_servers=kafka_broker.bootstrap, topic=prefix + ".{channel}",
                               max_topics=3, create_topics={"partitions": 1})
    sink = KafkaSink(options, make_context("kafka-out"))
    await sink.start()
    await sink.write([{"channel": f"c{i % 40}", "seq": i} for i in range(200)])
    await sink.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        made = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
    finally:
        await admin.close()
    assert made == [f"{prefix}.c0", f"{prefix}.c1", f"{prefix}.c2"]
    got = await read_records(kafka_broker.bootstrap, made, expect=15, timeout=5)
    assert sorted(orjson.loads(r.value)["seq"] for r in got) == [i for i in range(200) if i % 40 < 3]
    dead = [orjson.loads(x) for x in sink.context.dead_letter.path.read_bytes().splitlines()]
    assert len(dead) == 185 and sink.dead_lettered == 185
    assert "already sends to max_topics=3 topics" in dead[0]["reason"]


async def test_a_worker_whose_sink_cannot_open_its_file_names_the_sink_in_its_one_line(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: `pipeline: /x/a-file: cannot create directory: Not a directory`, not which sink of the config."""
    name = f"sinkpath{os.getpid()}"
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    (tmp_path / "a-file").write_text("")
    doc = yaml.safe_load(cfg.read_text())
    doc["sinks"].append({"type": "jsonl", "path": str(tmp_path / "a-file/out.jsonl")})
    cfg.write_text(yaml.safe_dump(doc))
    code, text = await run_worker(cfg, tmp_path)
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1] == (
        f"pipeline: sinks[1]:jsonl: {tmp_path / 'a-file'}: cannot create directory: Not a directory"), text[-3000:]


async def test_a_worker_whose_dead_letter_path_is_unusable_stops_with_one_line(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: the agent crashed on it ("Crashed reason=StageError(...)") and the worker ran on, reading
    nothing, until killed."""
    name = f"deadpath{os.getpid()}"
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    (tmp_path / "a-file").write_text("")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "out/dead-letter.jsonl"),
                                           str(tmp_path / "a-file/dead-letter.jsonl")))
    code, text = await run_worker(cfg, tmp_path)
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1] == (
        f"pipeline: {tmp_path / 'a-file/dead-letter.jsonl'}: cannot write the dead-letter file: "
        f"{tmp_path / 'a-file'}: cannot create directory: Not a directory"), text[-3000:]
