"""A worker restoring its tables reads again the changelog records faust fetched and dropped.

faust can drop records of a changelog partition that the Kafka client had already
handed over while a worker restores its tables (a fetch made before a rebalance
that returns after it: faust throws it away on seeing the new generation). The client had moved past them,
so the restore waited for them for ever and the worker processed nothing
(`bench.faust_churn 3 0s slow 2 --only 1`, about 1 run in 90). Here the real
worker, on the real broker, drops the first fetch of each window changelog
partition during its restore, as that race does; the events sent after it
starts must still reach the sink.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from bench.faust_churn import delivered, numbered
from pipeline.config import load_config
from pipeline.runtime.faust_ingest import app_id, ingest_topic
from pipeline.runtime.faust_recovery import REREADS
from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.test_faust_runtime import ROOT, Workers, window_config

pytestmark = pytest.mark.timeout(120)

DROP_FIRST_FETCH = '''
from faust.transport import consumer

_getmany = consumer.Consumer.getmany
dropped = set()


async def getmany(self, timeout):
    dropping = set()
    async for tp, message in _getmany(self, timeout):
        if tp in dropping or (self.app.in_recovery and self._is_changelog_tp(tp) and "window" in tp.topic
                              and tp not in dropped):
            dropped.add(tp)  # the whole first fetch of the partition is lost, its position moved on
            dropping.add(tp)
            continue
        yield tp, message


consumer.Consumer.getmany = getmany
'''


async def produce(bootstrap: str, topic: str, numbers: range) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for n in numbers:  # one at a time: the worker writes its changelog in several record batches
            sid = f"cap-{n % 8}"
            await producer.send_and_wait(topic, numbered(n, sid), key=sid.encode())
    finally:
        await producer.stop()


async def wait_delivered(out: Path, wanted: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted <= delivered(out):
        await asyncio.sleep(0.2)
    return wanted - delivered(out)


async def test_a_restore_reads_again_changelog_records_faust_dropped(
        tmp_path: Path, kafka_broker: Broker) -> None:  # noqa: F811
    cfg_path, _ = window_config(tmp_path, kafka_broker.bootstrap, "recovery", "1h")
    topic = ingest_topic(load_config(str(cfg_path)))
    out = tmp_path / "out/events.jsonl"
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "sitecustomize.py").write_text(DROP_FIRST_FETCH)
    plain = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"}
    dropping = {**plain, "PYTHONPATH": os.pathsep.join([str(ROOT), str(drop)])}
    first = Workers(cfg_path, tmp_path, plain)
    proc = first.start()
    try:
        await first.settled(1)
        await produce(kafka_broker.bootstrap, topic, range(24))  # open windows: the changelog holds them
        assert not await wait_delivered(out, set(range(24)), 30)
    finally:
        assert first.stop(proc) == 0
    second = Workers(cfg_path, tmp_path / "second", dropping)
    (tmp_path / "second").mkdir()
    second.start()
    try:
        await second.settled(1)  # assigned: its restore runs (and, before, never ended)
        await produce(kafka_broker.bootstrap, topic, range(24, 40))
        missing = await wait_delivered(out, set(range(24, 40)), 30)
        log = (tmp_path / "second/worker-0.log").read_text()
        assert not missing, log[-3000:]
        assert "were fetched but never applied; reading them again" in log
    finally:
        assert set(second.stop_all()) == {0}


async def test_a_restore_goes_on_without_changelog_records_it_cannot_read(
        tmp_path: Path, kafka_broker: Broker) -> None:  # noqa: F811
    """Records at the end of a changelog partition that faust cannot decode came again on every re-read and
    were never applied: the restore read them again every 3 s for ever and the worker processed nothing."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    cfg_path, _ = window_config(tmp_path, kafka_broker.bootstrap, "unreadable", "1h")
    cfg = load_config(str(cfg_path))
    changelog = f"{app_id(cfg)}-window_stages_1__window-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:  # a foreign record, not JSON, is all one partition of the window's changelog holds
        await admin.create_topics([NewTopic(changelog, num_partitions=4, replication_factor=1)])
        await producer.send_and_wait(changelog, b'{"cut', key=b"not json", partition=0)
    finally:
        await producer.stop()
        await admin.close()
    out = tmp_path / "out/events.jsonl"
    workers = Workers(cfg_path, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"})
    workers.start()
    try:
        await workers.settled(1)
        await produce(kafka_broker.bootstrap, ingest_topic(cfg), range(8))
        missing = await wait_delivered(out, set(range(8)), 30)
        log = (tmp_path / "worker-0.log").read_text()
        assert not missing, log[-3000:]
        assert log.count("reading them again") == REREADS
        assert "never applied (not readable as table state); restoring without them" in log
    finally:
        assert set(workers.stop_all()) == {0}
