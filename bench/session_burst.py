"""Benchmark: what a burst of session creates does to the sessions already streaming.

M sessions stream through one local pipeline (emulator and pipeline as in bench/sessions.py,
each pinned to its own core); then N more are created through the session API as fast as it
answers (32 requests at once) and each is started by its desktop client as soon as it is made.
Every new session's record is written several times (create, `starting`, `active`, an index
per screen, the bind). Measured in the pipeline (the latency probe with `loop_lag`), over a
steady window before the burst and over the burst itself (first create to the last new session
bound): the event loop's worst lag (how late a 5 ms sleep wakes) and the p99 and max latency
from receipt to sink of every event in the window.

    .venv/bin/python -m bench --only session_burst          # M = N = 500
    PYTHONPATH=. .venv/bin/python -c "from bench import session_burst as b; print(b.run(500))"
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import orjson

from bench.common import Result, pipeline_config, rules_spec, workdir
from bench.sessions import EVENTS_PER_SESSION, TOKEN, bound_sessions, percentile, scenario, start_api_pipeline

STEADY: Final = 5.0  # seconds of the window before the burst
CONCURRENT: Final = 32  # creates in flight at once
TARGET_LAG_MS: Final = 50.0


Snap = tuple[dict[int, int], dict[int, int], list[float], float]


def _probe(path: Path) -> Snap:
    """(latency histogram in 0.1 ms buckets, loop-lag histogram in 1 ms buckets, ms spent in garbage collection
    per generation, the longest collection so far), as last written."""
    snap = orjson.loads(path.read_bytes())
    return ({int(k): v for k, v in snap["hist"].items()}, {int(k): v for k, v in snap.get("lag", {}).items()},
            snap["gc"], snap["gc_max"])


def _fresh(path: Path, after: float) -> Snap:
    """The probe's first snapshot written after wall time `after` (it writes one every 0.5 s)."""
    while orjson.loads(path.read_bytes())["t"] < after:
        time.sleep(0.05)
    return _probe(path)


def _window(a: Snap, b: Snap) -> dict[str, float]:
    lat = {k: v - a[0].get(k, 0) for k, v in b[0].items() if v - a[0].get(k, 0)}
    lag = {k: v - a[1].get(k, 0) for k, v in b[1].items() if v - a[1].get(k, 0)}
    return {"p99": percentile(lat, 0.99), "max": (max(lat) + 1) / 10 if lat else float("nan"),
            "events": sum(lat.values()), "lag_max": float(max(lag)) if lag else 0.0,
            "lag_over_20": sum(v for k, v in lag.items() if k >= 20), "gc_ms": sum(b[2]) - sum(a[2]),
            "gc2_ms": b[2][2] - a[2][2], "gc_max": b[3] if b[3] > a[3] else 0.0}


async def _drive(api: str, emu: str, m: int, n: int, probe: Path, sessions_dir: Path) -> dict[str, Any]:
    import aiohttp

    auth = {"Authorization": f"Bearer {TOKEN}"}
    sem = asyncio.Semaphore(CONCURRENT)
    async with aiohttp.ClientSession() as http:
        async def create_and_start(i: int) -> None:
            async with sem:
                async with http.post(f"{api}/v1/sessions", json={"end_user_id": f"user-{i}"}, headers=auth) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"POST /v1/sessions: {r.status} {body}")
                async with http.post(f"{emu}/_emulator/sessions/{body['session_id']}/start") as r:
                    if r.status != 200:
                        raise RuntimeError(f"emulator start: {r.status} {await r.text()}")

        async def bound(k: int, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while bound_sessions(sessions_dir, 2) < k:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.2)
            return True

        await asyncio.gather(*(create_and_start(i) for i in range(m)))
        if not await bound(m, 60 + m / 20):
            raise RuntimeError(f"the first {m} sessions were not all bound")
        await asyncio.sleep(2.0)  # their first events: the backfill after the bind, catching up
        t0 = time.time()
        steady0 = _fresh(probe, t0)
        await asyncio.sleep(STEADY)
        steady1 = burst0 = _fresh(probe, time.time())
        b0 = time.perf_counter()
        await asyncio.gather(*(create_and_start(m + i) for i in range(n)))
        created_s = time.perf_counter() - b0
        done = await bound(m + n, 60 + n / 20)
        burst_s = time.perf_counter() - b0
        burst1 = _fresh(probe, time.time())
    return {"steady": _window(steady0, steady1), "burst": _window(burst0, burst1), "created_s": created_s,
            "burst_s": burst_s, "all_bound": done}


def measure(m: int, n: int, out: Path) -> dict[str, Any]:
    """Fresh emulator and pipeline processes; M sessions streaming, then N created at once."""
    tag = f"{m}-{n}"
    state = out / f"state-{tag}"
    shutil.rmtree(state, ignore_errors=True)
    scn = scenario(out / f"scenario-{tag}.jsonl", 3600)
    probe = out / f"latency-{tag}.json"
    probe.unlink(missing_ok=True)
    cfg = pipeline_config(f"bench-burst-{tag}", {"type": "videodb"}, [
        {"type": "jsonl", "path": str(out / f"events-{tag}.jsonl"), "clear": True},
        {"type": "bench.sessions:LatencySink", "path": str(probe), "loop_lag": True}], out, rules=rules_spec(100))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        emu_url, api, _ = start_api_pipeline(cfg, out, tag, procs, scn, max(10_000, m + n), pin=True)
        pipe = procs[1]
        while not probe.exists():
            if pipe.poll() is not None:
                raise RuntimeError(f"the pipeline exited {pipe.returncode}: see {out / f'pipeline-{tag}.log'}")
            time.sleep(0.1)
        return asyncio.run(_drive(api, emu_url, m, n, probe, state / "sessions"))
    finally:
        from tests.procs import stop_process

        for p in reversed(procs):
            stop_process(p, timeout=60)


def run(n: int, *, m: int | None = None) -> list[Result]:
    """`m` (default `n`) sessions streaming, then `n` created at once."""
    m = n if m is None else m
    r = measure(m, n, workdir("session_burst"))
    s, b = r["steady"], r["burst"]
    res = Result(f"session_burst: {n:,} created while {m:,} stream, worst event-loop lag", b["lag_max"], "ms",
                 target=f"< {TARGET_LAG_MS:g} ms", ok=b["lag_max"] < TARGET_LAG_MS and b["p99"] < TARGET_LAG_MS)
    res.notes.append(f"burst: {r['burst_s']:.1f}s (created in {r['created_s']:.1f}s"
                     f"{'' if r['all_bound'] else ', NOT all bound'}); receipt->sink p99 {b['p99']:.1f} ms, "
                     f"max {b['max']:.1f} ms over {b['events']:,} events; {b['lag_over_20']} loop lags >= 20 ms; "
                     f"garbage collection {b['gc_ms']:.0f} ms ({b['gc2_ms']:.0f} ms full), "
                     + (f"longest {b['gc_max']:.0f} ms" if b["gc_max"] else "none longer than before the burst"))
    res.notes.append(f"steady {STEADY:g}s before: receipt->sink p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms "
                     f"({s['events']:,} events, want ~{m * EVENTS_PER_SESSION * STEADY:,.0f}); worst loop lag "
                     f"{s['lag_max']:.0f} ms, {s['lag_over_20']} >= 20 ms")
    return [res]
