"""`buffer: {type: disk}` with the real broker: a broker outage spills to disk instead of stalling the other
sinks, and a `kill -9` while events are spooled loses nothing and delivers nothing twice after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from tests.broker import Broker, free_port, own_broker, read_records  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(120)
#: Seconds the broker is down in the outage test; `SPILL_OUTAGE_SECONDS=30` runs it as long as a real outage may be.
OUTAGE = float(os.environ.get("SPILL_OUTAGE_SECONDS", "8"))


def event(i: int, unix_ts: float | None = None) -> dict:
    ev = {"channel": "transcript", "id": i, "rtstream_id": "rts-1", "capture_session_id": "cap-1",
          "data": {"text": f"event {i}", "is_final": True, "start": 1710000000000 + i}}
    if unix_ts is not None:
        ev["unix_ts"] = unix_ts
    return ev


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def ids_of(records: list) -> list[int]:
    return [orjson.loads(r.value)["id"] for r in records]


async def test_broker_outage_spills_to_disk_and_the_jsonl_sink_keeps_pace(
        tmp_path: Path, own_broker: Broker) -> None:  # noqa: F811
    """200 events/s for OUTAGE + 3 s; the broker is SIGKILLed at 1.5 s and back OUTAGE (8) s later. Before, the kafka
    sink's blocked write stopped ingest and the jsonl sink with it; now its batches spill to the spool."""
    rate = 200
    total = int(rate * (OUTAGE + 3))
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i, 1000 + i / rate)) + b"\n" for i in range(total)))
    own_broker.start()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: spill
source: {{type: replay, path: {src}, speed: 1}}
sinks:
  - type: kafka
    bootstrap_servers: {own_broker.bootstrap}
    topic: spill
    request_timeout: 1s
    max_retry_backoff: 500ms
    buffer: {{type: disk}}
  - {{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0.05s}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    kafka = rt.b.sinks[0].sink
    run = asyncio.create_task(rt.run())
    t0 = time.monotonic()
    lag: list[float] = []
    acked_before_kill = -1
    broker_back = False
    while not run.done():
        await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t0
        if acked_before_kill < 0 and elapsed >= 1.5:
            await asyncio.to_thread(own_broker.stop)
            acked_before_kill = kafka.delivered  # acknowledged by the broker that just died
        if not broker_back and elapsed >= 1.5 + OUTAGE:
            # what the dead broker acknowledged: read again now, as an ack it sent just before its kill may have
            # been counted only after the read above (a loaded machine: 2 events "missing" that it had taken)
            acked_before_kill = kafka.delivered
            await asyncio.to_thread(own_broker.start)
            broker_back = True
        written = count_lines(tmp_path / "out.jsonl")
        if acked_before_kill >= 0 and not broker_back and written < total:
            lag.append(elapsed - written / rate)  # how far the jsonl sink is behind the source's schedule
    assert await run == 0
    assert count_lines(tmp_path / "out.jsonl") == total
    outage_lag = max(lag) - min(lag)
    print(f"jsonl lag growth during the {OUTAGE:g} s broker outage: {outage_lag * 1000:.0f} ms")
    assert outage_lag < 1.0, f"the jsonl sink fell {outage_lag:.1f}s behind while the broker was down"
    got = ids_of(await read_records(own_broker.bootstrap, ["spill"], expect=total - acked_before_kill))
    # tansu keeps records in memory: what it acknowledged before its SIGKILL is gone with it
    missing = sorted(set(range(acked_before_kill, total)) - set(got))
    assert not missing, f"{len(missing)} events never reached the topic, first {missing[:5]}"
    assert not (tmp_path / "dead.jsonl").exists()


async def _stream(plan: list[int], rate: float):  # type: ignore[no-untyped-def]
    """A WebSocket server: connection k sends plan[k] more numbered events, then holds the connection."""
    import websockets

    state = {"next": 0, "conn": 0}

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        k = state["conn"]
        state["conn"] += 1
        await ws.send(orjson.dumps({"connection_id": f"conn-{k}"}).decode())
        for _ in range(plan[k] if k < len(plan) else 0):
            i = state["next"]
            state["next"] += 1
            await ws.send(orjson.dumps(event(i)).decode())
            if i % 20 == 0:
                await asyncio.sleep(20 / rate)
        await asyncio.Future()

    return await websockets.serve(handler, "127.0.0.1", 0)


async def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_kill_9_with_events_spooled_then_restart_delivers_each_exactly_once(tmp_path: Path) -> None:
    """Run 1: broker down, 2,000 events spooled, kill -9. Run 2: broker up, the spool drains first, 1,000 new
    events follow, kill -9 after delivery. Run 3: nothing left, nothing delivered again."""
    server = await _stream([2000, 1000], rate=4000)
    port = server.sockets[0].getsockname()[1]
    broker = Broker(free_port(), log_path=tmp_path / "tansu.log")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: crash
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.2s}}
sinks:
  - type: kafka
    bootstrap_servers: {broker.bootstrap}
    topic: crash
    request_timeout: 1s
    max_retry_backoff: 500ms
    buffer: {{type: disk}}
  - {{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0.05s}}
dead_letter: {tmp_path}/dead.jsonl
""")
    jsonl = tmp_path / "out.jsonl"
    spool = tmp_path / "out/crash/spool/sinks-0-kafka"

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*PIPELINE, "run", str(cfg), cwd=tmp_path, env=ENV,
                                                    stderr=asyncio.subprocess.PIPE)

    try:
        run1 = await start()
        await _wait(lambda: count_lines(jsonl) >= 2000, 30, "run 1 to read 2,000 events")
        run1.kill()  # SIGKILL with every event spooled and none delivered
        await run1.wait()
        assert sum(p.stat().st_size for p in spool.glob("*.seg")) > 2000 * 100

        broker.start()
        run2 = await start()
        got: list = []

        async def topic_has(n: int) -> None:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                got[:] = await read_records(broker.bootstrap, ["crash"], expect=n, timeout=3)
                if len(got) >= n:
                    return
            raise AssertionError(f"topic has {len(got)} of {n} records")

        await topic_has(3000)
        await asyncio.sleep(1.0)  # acks are written right after the broker acknowledges; leave time for that
        run2.kill()
        _, err2 = await run2.communicate()
        assert b"left in the spool by an earlier run; delivering them first" in err2

        run3 = await start()
        await asyncio.sleep(3)
        run3.send_signal(signal.SIGTERM)
        _, err3 = await asyncio.wait_for(run3.communicate(), 30)
        assert run3.returncode == 0, err3.decode()
        final = ids_of(await read_records(broker.bootstrap, ["crash"], expect=3001, timeout=3))
    finally:
        server.close()
        broker.stop()
    dupes = [i for i, n in Counter(final).items() if n > 1]
    assert not dupes, f"{len(dupes)} events delivered twice, e.g. {dupes[:5]}"
    assert sorted(final) == list(range(3000))
    assert ids_of(got[:2000]) == list(range(2000)), "the spool was not drained first, in order"


async def test_torn_spool_tail_is_dead_lettered_and_the_rest_delivered(
        tmp_path: Path, own_broker: Broker) -> None:  # noqa: F811
    """A kill -9 in the middle of an append leaves a partial record: the restart reports it with one
    dead-letter line, delivers every complete record, and appends new ones on a clean boundary."""
    from pipeline.state.spool import Spool

    spool_dir = tmp_path / "state/spool/sinks-0-kafka"
    sp = Spool(spool_dir)
    sp.open()
    for b in range(3):
        sp.append(orjson.dumps([event(b * 10 + i) for i in range(10)]), 10)
    sp.close()
    seg = next(spool_dir.glob("*.seg"))
    seg.write_bytes(seg.read_bytes()[:-50])  # the third batch is torn
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(100 + i)) + b"\n" for i in range(5)))
    own_broker.start()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: torn
source: {{type: replay, path: {src}}}
sinks:
  - {{type: kafka, bootstrap_servers: {own_broker.bootstrap}, topic: torn, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    assert await rt.run() == 0
    got = ids_of(await read_records(own_broker.bootstrap, ["torn"], expect=25))
    assert got == [*range(20), *range(100, 105)]
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert len(dead) == 1 and dead[0]["reason"].startswith("spool: torn record")
    assert dead[0]["origin"]["spool"].endswith(seg.name)
    assert "from earlier spool 20" in rt.summary()


async def test_shutdown_leaves_a_disk_backlog_spooled_and_the_next_run_delivers_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """drain_timeout ends a run whose slow sink is behind: with a disk buffer nothing is dead-lettered, the
    backlog (and the write cut short) stays in the spool, and the next run delivers it once."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i)) + b"\n" for i in range(2000)))
    counts = tmp_path / "counts.txt"
    cfg = tmp_path / "p.yaml"

    def config(delay: float, buffer: str = "disk") -> Path:
        cfg.write_text(f"""
name: backlog
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{drain_timeout: 0.5s}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {counts}, delay: {delay}, buffer: {{type: {buffer}}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
        return cfg

    rt = LocalRuntime(build(load_config(config(0.2))), install_signals=False)
    assert await rt.run() == 0
    first = sum(int(x) for x in counts.read_text().split())
    assert 0 < first < 2000
    assert f"left spooled {2000 - first}" in rt.summary()
    assert not (tmp_path / "dead.jsonl").exists()

    src.write_bytes(b"")  # the next runs read nothing new
    assert await LocalRuntime(build(load_config(config(0, "memory"))), install_signals=False).run() == 0
    assert "undelivered byte(s) spooled under an earlier configuration" in caplog.text  # said, not lost
    rt = LocalRuntime(build(load_config(config(0))), install_signals=False)
    assert await rt.run() == 0
    assert sum(int(x) for x in counts.read_text().split()) == 2000
    assert f"from earlier spool {2000 - first}" in rt.summary() and "left spooled" not in rt.summary()
