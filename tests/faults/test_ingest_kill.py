"""kill -9 on the faust path: the ingest mid-publish and a worker mid-batch, then restart; nothing lost.

Real broker, real `pipeline run` / `pipeline worker` processes, real SIGKILL. The ingest packs
each round's events per partition into one JSON Lines record, so a lost or reordered record
would lose or reorder many events at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.test_faust_runtime import Workers, count, workers_env, write_config  # noqa: F401

pytestmark = pytest.mark.timeout(150)

CLI = [sys.executable, "-m", "pipeline.cli"]
SESSIONS, PER_SESSION = 60, 100


def replay_file(path: Path) -> list[tuple[str, int]]:
    """SESSIONS sessions interleaved, PER_SESSION events each, 1 ms apart (paced at 1x: ~6 s)."""
    t0 = time.time()
    order: list[tuple[str, int]] = []
    with path.open("wb") as fh:
        for i in range(SESSIONS * PER_SESSION):
            sid, seq = f"cap-{i % SESSIONS:03d}", i // SESSIONS
            order.append((sid, seq))
            fh.write(orjson.dumps({"channel": "transcript", "capture_session_id": sid, "seq": seq,
                                   "unix_ts": t0 + i * 0.001, "data": {"text": f"line {seq}"}}) + b"\n")
    return order


async def start_ingest(cfg: Path, env: dict[str, str], replay: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*CLI, "run", str(cfg), env={**env, "REPLAY": str(replay)},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def test_kill_9_of_the_ingest_mid_publish_and_of_a_worker_mid_batch_loses_and_reorders_nothing(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    replay = tmp_path / "sessions.jsonl"
    want = replay_file(replay)
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "out", stages=[], name=f"kill{os.getpid()}")
    doc = yaml.safe_load(cfg.read_text())
    doc["source"]["speed"] = 1
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out/events.jsonl"
    workers = Workers(cfg, tmp_path, workers_env)
    try:
        first = workers.start()
        workers.start()
        await workers.settled(2)

        run1 = await start_ingest(cfg, workers_env, replay)  # killed mid-publish: once rounds are through
        deadline = time.monotonic() + 30  # (a fixed 1.5 s was too short on a loaded machine: nothing out yet)
        while count(out) == 0 and run1.returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert run1.returncode is None, "the first ingest ended before anything was written"
        run1.send_signal(signal.SIGKILL)
        await run1.wait()
        assert 0 < count(out) < len(want), "the first ingest was not killed mid-publish"

        run2 = await start_ingest(cfg, workers_env, replay)  # the restart replays everything
        await asyncio.sleep(1.0)
        workers.stopped.add(first.pid)
        first.send_signal(signal.SIGKILL)  # a worker mid-batch: its partitions move, uncommitted ones again
        workers.start()
        _, err = await asyncio.wait_for(run2.communicate(), 60)
        assert run2.returncode == 0, err.decode()[-2000:]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen_once(out)) < len(want):
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)
    finally:
        workers.stop_all()

    got = seen_once(out)
    missing = set(want) - set(got)
    assert not missing, f"{len(missing)} event(s) lost, e.g. {sorted(missing)[:5]}"
    for sid in {s for s, _ in want}:  # each session's events in ingest order (first sightings)
        mine = [seq for s, seq in got if s == sid]
        assert mine == list(range(PER_SESSION)), (sid, mine[:20])
    assert not (tmp_path / "out/dead-letter.jsonl").exists()


def seen_once(path: Path) -> list[tuple[str, int]]:
    """(session, seq) in file order, each at its first sighting; a line torn by kill -9 is skipped."""
    seen: dict[tuple[str, int], None] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            seen.setdefault((ev["capture_session_id"], ev["seq"]), None)
    return list(seen)
