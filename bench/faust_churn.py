"""Probe (not a benchmark): do faust workers deliver every event through worker churn?

`python -m bench.faust_churn [ITERATIONS] [BATCH_WAIT] [fast|slow] [SEED]`

Each iteration: a fresh test broker topic, one `pipeline worker`, a producer
sending bursty input (1 to 1,500 events, pauses of 10 ms to 2.5 s) keyed by 16
sessions, and four random actions among: another worker joins, one is killed
(SIGKILL), one is stopped (SIGTERM). Then the input stops, and every event
produced must be in the workers' output within 30 s. `slow` gives the second
sink 0.7 s per batch. It prints one line per iteration and, for events
missing, their (n, partition, offset). It found (and now checks the fix of)
records skipped after rebalances: a batch fetched before a rebalance arrived
after the seek to the committed offset, and faust skipped the records between
(90 of 3,008 events with seed 0, `3 0s slow 0`; offsets 2 to 48 of one
partition in another run); see pipeline/runtime/faust_seek.py. Still open (see README):
seed 2's iteration with a SIGTERM and a SIGKILL missed 31 of 103 events in one
of two runs (the worker left read nothing in its last 27 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.common import ROOT
from tests.broker import running_broker
from tests.test_faust_runtime import Workers, write_config


async def produce(bootstrap: str, topic: str, stop: asyncio.Event, sent: dict[int, Any]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    n = 0
    try:
        while not stop.is_set():
            for _ in range(random.choice([1, 1, 1, 5, 50, 1500])):
                sid = f"cap-{random.randrange(16)}"
                event = {"channel": "transcript", "capture_session_id": sid, "rtstream_id": f"r-{sid}", "n": n,
                         "data": {"text": "hello world", "start": 1710000000000 + n, "end": 1710000000500 + n}}
                sent[n] = await producer.send(topic, orjson.dumps(event), key=sid.encode())
                n += 1
            await asyncio.sleep(random.choice([0.01, 0.2, 0.9, 1.1, 2.5]))
        await producer.flush()
    finally:
        await producer.stop()


def delivered(path: Path) -> set[int]:
    if not path.exists():
        return set()
    return {e["n"] for e in map(orjson.loads, path.read_bytes().splitlines()) if "n" in e}


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        print(f"  worker {proc.pid} did not stop within 40 s of SIGTERM", flush=True)
        proc.kill()
        proc.wait()


async def churn(workers: Workers, live: list[subprocess.Popen[bytes]]) -> list[str]:
    actions = []
    for _ in range(4):
        await asyncio.sleep(random.uniform(0.5, 4))
        act = random.choice(["join", "join", "kill9", "term", "none"])
        if act == "join" or (len(live) == 1 and act != "none"):
            live.append(workers.start())
            act = "join"
        elif act == "kill9":
            victim = live.pop(random.randrange(len(live)))
            victim.kill()
            victim.wait()
        elif act == "term":
            stop(live.pop(random.randrange(len(live))))
        actions.append(act)
    return actions


async def iteration(bootstrap: str, tmp: Path, it: int, wait: str, sink: str) -> int:
    cfg = write_config(tmp / "f.yaml", engine="faust", bootstrap=bootstrap, out=tmp / "out",
                       stages=[{"type": "enrich"}, {"type": "window", "size": "1s"}], name=f"churn{it}")
    doc = yaml.safe_load(cfg.read_text())
    doc["runtime"]["batch_wait"] = wait
    if sink == "slow":
        doc["sinks"][1] = {"type": "tests.slow_sink:SlowSink", "path": str(tmp / "slow.txt"), "delay": 0.7}
    cfg.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"}
    workers = Workers(cfg, tmp, env)
    live = [workers.start()]
    deadline = time.monotonic() + 60
    while not workers.assignments() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    done, sent = asyncio.Event(), {}
    producing = asyncio.ensure_future(produce(bootstrap, f"churn{it}-ingest", done, sent))
    actions = await churn(workers, live)
    done.set()
    await producing
    started = time.monotonic()
    while time.monotonic() - started < 30 and not set(sent) <= delivered(tmp / "out/events.jsonl"):
        await asyncio.sleep(0.5)
    missing = sorted(set(sent) - delivered(tmp / "out/events.jsonl"))
    print(f"iteration {it}: batch_wait {wait}, {sink} sink, {actions}: {len(missing)} of {len(sent)} missing "
          f"(logs in {tmp})", flush=True)
    if missing:
        where = [(n, sent[n].result().partition, sent[n].result().offset) for n in missing[:10]]
        print(f"  first missing (n, partition, offset): {where}; assignments {workers.assignments()}", flush=True)
    for proc in live:
        stop(proc)
    return len(missing)


async def main(iterations: int, wait: str, sink: str, seed: int) -> int:
    base = Path(f"/tmp/faust-churn-{os.getpid()}")
    base.mkdir()
    with running_broker(log_path=base / "tansu.log") as broker:
        lost = 0
        for it in range(iterations):
            random.seed(seed + it)
            (base / f"it{it}").mkdir(parents=True)
            lost += await iteration(broker.bootstrap, base / f"it{it}", it, wait, sink)
    return 1 if lost else 0


if __name__ == "__main__":
    args = sys.argv[1:] + ["3", "0s", "slow", "0"][len(sys.argv) - 1:]
    sys.exit(asyncio.run(main(int(args[0]), args[1], args[2], int(args[3]))))
