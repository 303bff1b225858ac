"""The faust ingest packs each round's events for one partition into one JSON Lines record.

Why: a faust worker pays its stream machinery per Kafka record, so at 1,000
sessions one record per event cost more CPU than the stages themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from pipeline.config import load_config
from pipeline.runtime.faust import Worker
from pipeline.runtime.faust_ingest import IngestSink, SessionKeys
from pipeline.session import SessionLink
from stages.sinks.kafka import CreateTopics, KafkaSink, KafkaSinkOptions
from stages.sinks.kafka.records import Pending, Record, pack
from stages.sinks.kafka.sink import _MEMO_KEYS
from tests.broker import Broker, kafka_broker, read_records  # noqa: F401
from tests.test_faust_latency import config

pytestmark = pytest.mark.timeout(90)


def record(value: bytes) -> Record:
    return Record("t", b"k", value, [], {}, Pending(0, None))  # type: ignore[arg-type]


def message(value: Any, offset: int, partition: int = 1) -> Any:
    """What faust hands the worker: the record value and its origin."""
    return SimpleNamespace(value=value, message=SimpleNamespace(topic="x-ingest", partition=partition,
                                                                offset=offset))


async def started_ingest_sink(make_context: Callable[..., Context], bootstrap: str, topic: str,
                              partitions: int) -> IngestSink:
    options = KafkaSinkOptions(bootstrap_servers=bootstrap, topic=topic, key=None,
                               create_topics=CreateTopics(partitions=partitions), linger_ms=0)
    sink = IngestSink(options, make_context("runtime.ingest"))
    sink.key_of = SessionKeys(SessionLink())
    await sink.start()
    return sink


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b" ")), max_size=40),
       st.integers(min_value=16, max_value=1024))
def test_pack_keeps_every_event_in_order_within_the_size_limit(values: list[bytes], limit: int) -> None:
    records = [record(v) for v in values]
    units = list(pack(records, limit))
    assert [m for *_, members in units for m in members] == records  # each once, in order
    for key, value, headers, members in units:
        assert key is None and headers == []
        assert value.split(b"\n") == [m.value for m in members]
        assert len(value) <= limit or len(members) == 1  # a longer event travels alone


def test_the_partition_memo_is_bounded(make_context: Callable[..., Context]) -> None:
    sink = KafkaSink(KafkaSinkOptions(), make_context("kafka-out"))
    parts = [0, 1, 2, 3]
    memo = sink._partition_memo(parts)
    for i in range(_MEMO_KEYS):
        memo[f"cap-{i}".encode()] = 0
    assert sink._partition_memo(parts) == {}  # full: a fresh one, so hostile keys cannot grow it
    assert sink._partition_memo([0, 1]) is not sink._partition_memo(parts)


async def test_one_round_becomes_one_record_per_partition_and_workers_see_every_event_in_order(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """200 events of 8 sessions in one write: at most 4 records (one per partition) instead of 200."""
    topic = "packed-ingest"
    sink = await started_ingest_sink(make_context, kafka_broker.bootstrap, topic, 4)
    events = [{"channel": "transcript", "capture_session_id": f"cap-{i % 8}", "seq": i} for i in range(200)]
    await sink.write(events)
    await sink.close()
    assert sink.delivered == 200

    records = await read_records(kafka_broker.bootstrap, [topic], expect=1, timeout=5)
    assert 1 <= len(records) <= 4
    assert all(not r.headers for r in records)  # per-event headers would not describe a packed record
    seen: list[dict[str, Any]] = []
    partition_of: dict[str, set[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        for line in r.value.split(b"\n"):
            ev = orjson.loads(line)
            seen.append(ev)
            partition_of.setdefault(ev["capture_session_id"], set()).add(r.partition)
    assert sorted(e["seq"] for e in seen) == list(range(200))
    assert all(len(p) == 1 for p in partition_of.values())  # a session stays in one partition
    for cap in partition_of:  # ... in order
        mine = [e["seq"] for e in seen if e["capture_session_id"] == cap]
        assert mine == sorted(mine)


def decode_with_dead_letters(tmp_path: Path, *values: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """A worker's decoding of records of partition 1 at offsets 0.., and what it dead-lettered."""
    worker = Worker(load_config(config(tmp_path, "127.0.0.1:9")), tmp_path / "w", 10.0)
    batch: list[Any] = []
    for i, v in enumerate(values):
        worker._decode(message(v, i), batch)
    worker.built.dead_letter.close()
    path = worker.built.dead_letter.path
    dead = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
    return batch, dead


async def test_a_worker_decodes_every_line_and_dead_letters_only_the_bad_ones(tmp_path: Path) -> None:
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    batch, dead = decode_with_dead_letters(
        tmp_path, b'{"n":1}\n[1]\n{"n":2}\nnot json\n' + deep + b'\n{"n":3}',
        b'{"n":4}',  # one event per record, as older ingests wrote
        b"\n")
    assert batch == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    assert [(d["origin"]["offset"], d["origin"].get("line")) for d in dead] == [(0, 2), (0, 4), (0, 5), (2, None)]
    assert "nested deeper" in dead[2]["reason"]


async def test_dead_letter_line_numbers_count_blank_lines_and_crlf_blank_lines_are_skipped(
        tmp_path: Path) -> None:
    """origin.line is the line in the record value (1-based), blank lines included; `\\r\\n` ends a line too."""
    batch, dead = decode_with_dead_letters(
        tmp_path, b'{"n":1}\n\n\nnot json\n{"n":2}',
        b'{"n":3}\r\n\r\n{"n":4}\r\n',  # another producer writing CRLF JSON Lines
        b"\n\n[1]\n")
    assert batch == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    assert [(d["origin"]["offset"], d["origin"].get("line")) for d in dead] == [(0, 4), (2, 3)]


async def test_a_pretty_printed_event_from_another_producer_is_one_event_not_bad_lines(tmp_path: Path) -> None:
    pretty = orjson.dumps({"channel": "transcript", "data": {"text": "hi"}}, option=orjson.OPT_INDENT_2)
    batch, dead = decode_with_dead_letters(tmp_path, pretty, b'{"n":1}\n' + pretty)
    assert batch == [{"channel": "transcript", "data": {"text": "hi"}}, {"n": 1}]
    # mixed with JSON Lines it cannot be told from bad lines: each of its 6 lines is dead-lettered
    assert [(d["origin"]["offset"], d["origin"].get("line")) for d in dead] == [(1, n) for n in range(2, 8)]


STREAMS_REMEMBERED = 65536  # pipeline.runtime.faust_ingest's bound


def test_the_ingest_remembers_a_bounded_number_of_rtstreams_newest_first() -> None:
    """Lifecycle events name rtstreams without end (a long run, or a hostile peer): the map stays bounded."""
    keys = SessionKeys(SessionLink())
    for i in range(STREAMS_REMEMBERED + 2000):
        keys({"event": "capture_session.active", "capture_session_id": f"cap-{i}",
              "data": {"rtstreams": [{"rtstream_id": f"rts-{i}"}]}})
    assert len(keys.by_stream) <= STREAMS_REMEMBERED
    last = STREAMS_REMEMBERED + 1999
    assert keys({"channel": "transcript", "rtstream_id": f"rts-{last}"}) == f"cap-{last}"  # newest kept


async def test_a_worker_hands_its_stages_bounded_slices_of_a_backlog_of_packed_records(tmp_path: Path) -> None:
    """1,000 packed records (a backlog) hold far more than 1,000 events: stages see them in bounded slices."""
    worker = Worker(load_config(config(tmp_path, "127.0.0.1:9")), tmp_path / "w", 10.0)
    await worker.start_sinks()
    sizes: list[int] = []
    sink = worker.built.sinks[0].sink
    write = sink.write

    async def spy(batch: Any) -> None:
        sizes.append(len(batch))
        await write(batch)

    sink.write = spy  # type: ignore[method-assign]
    per, records = 2000, 30
    values = [b"\n".join(orjson.dumps({"channel": "transcript", "seq": r * per + i}) for i in range(per))
              for r in range(records)]
    await worker.handle([message(v, n, partition=0) for n, v in enumerate(values)])
    await worker.close()
    written = [orjson.loads(line)["seq"] for line in (tmp_path / "out" / "events.jsonl").read_bytes().splitlines()]
    assert written == list(range(per * records))  # every event once, in order
    assert max(sizes) <= 10_000 + per  # a slice is closed once it holds 10,000 events (plus one record's)


async def test_events_near_and_over_the_pack_limit_and_near_max_request_size_all_arrive_in_order(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """One session's round mixes tiny events with ones of 256 KiB +- a little and one just under 1 MiB."""
    topic = "packed-sizes"
    sink = await started_ingest_sink(make_context, kafka_broker.bootstrap, topic, 2)
    options = sink.opts
    limit = options.max_batch_size
    pads = [10, 10, limit - 200, limit - 60, limit - 40, limit, limit + 1, 10, 300_000,
            options.max_request_size - 200, 10, limit // 2, limit // 2, limit // 2, 10]
    events = [{"capture_session_id": "cap-1", "seq": i, "pad": "x" * n} for i, n in enumerate(pads)]
    await sink.write(events)
    await sink.close()
    assert (sink.delivered, sink.dead_lettered) == (len(events), 0)

    records = await read_records(kafka_broker.bootstrap, [topic], expect=len(events), timeout=8)
    records.sort(key=lambda r: (r.partition, r.offset))
    assert len({r.partition for r in records}) == 1
    seqs = [orjson.loads(line)["seq"] for r in records for line in r.value.split(b"\n")]
    assert seqs == list(range(len(events)))  # none lost, none twice, in order
    assert all(len(r.value) <= limit or b"\n" not in r.value for r in records)


async def test_long_hostile_keys_do_not_fill_the_partition_memo(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """A key template over event text: 40 distinct 50 KB keys must not stay in memory (up to 65,536 would)."""
    options = KafkaSinkOptions(bootstrap_servers=kafka_broker.bootstrap, topic="memo-keys", key="{text}",
                               create_topics=CreateTopics(partitions=4), linger_ms=0)
    sink = KafkaSink(options, make_context("kafka-out"))
    await sink.start()
    events = [{"channel": "transcript", "text": f"{i:05d}" + "k" * 50_000} for i in range(40)]
    await sink.write(events)
    await sink.close()
    assert sink.delivered == 40
    held = sum(len(k) for memo in sink._memos.values() for k in memo)
    assert held <= 64 * 1024, f"the memo holds {held} bytes of keys"
    records = await read_records(kafka_broker.bootstrap, ["memo-keys"], expect=40, timeout=5)
    from aiokafka.partitioner import DefaultPartitioner

    part = DefaultPartitioner()
    assert all(r.partition == part(r.key, [0, 1, 2, 3], [0, 1, 2, 3]) for r in records)  # where aiokafka puts it
