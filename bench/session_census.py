"""What each capture session adds to the garbage collector's heap, counted in-process.

The emulator runs in its own process (`pipeline emulate --manual`, bench/sessions.py's
4 rtstreams, an event a second on each), so only the pipeline's objects are counted. A
videodb source and the capture_session controller with its session API run
here; `warm` sessions are created and streamed first (lazy imports, caches),
then the GC-tracked objects are counted by type, `n` more sessions are created
through the API, started through the emulator and streamed until each has
events on its 4 rtstreams, and counted again: the difference per session, and
how long a full `gc.collect()` takes with that heap.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.sessions import API_KEY, TOKEN, _wait_line, scenario
from pipeline.api import Context, StateStore
from pipeline.deadletter import DeadLetter
from pipeline.session import SessionLink
from pipeline.stats import StageStats


def census() -> Counter[str]:
    """GC-tracked objects by type name, after a full collection."""
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def collect_ms(repeat: int = 3) -> float:
    """The shortest of `repeat` full collections, in ms."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        gc.collect()
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def _context(stage: str, link: SessionLink, tmp: Path, emu_url: str) -> Context:
    ctx = Context(pipeline="census", stage=stage, dead_letter=DeadLetter(tmp / "dead-letter.jsonl"), session=link,
                  stats=StageStats(stage, "census"), state=StateStore(), out_dir=tmp, state_dir=tmp)
    ctx.settings = {"videodb": {"api_key": API_KEY, "base_url": emu_url, "collection_id": "default"}}
    return ctx


async def _measure(emu_url: str, n: int, warm: int, tmp: Path) -> dict[str, Any]:
    import aiohttp

    from stages.controller.capture_session import CaptureSessionController
    from stages.sources.videodb import VideoDBSource

    link = SessionLink()
    src = VideoDBSource(VideoDBSource.Options.model_validate({}), _context("source:videodb", link, tmp, emu_url))
    ctl = CaptureSessionController(CaptureSessionController.Options.model_validate({
        "api": {"listen": "127.0.0.1:0", "token": TOKEN, "max_sessions": 100_000},
        "on_active": {"transcript": True, "index_visuals": {"prompt": "Describe the screen"}}}),
        _context("controller:capture_session", link, tmp, emu_url))
    await ctl.start()
    pairs: set[str] = set()  # "session rtstream" that sent events (strings only: nothing tracked per session)
    streams: dict[str, int] = {}  # rtstreams per session that sent events

    async def ingest() -> None:
        async for batch in src.batches():
            ctl.observe(batch)
            for e in batch:
                sid, rid = e.get("capture_session_id"), e.get("rtstream_id")
                if sid and rid and f"{sid} {rid}" not in pairs:
                    pairs.add(f"{sid} {rid}")
                    streams[sid] = streams.get(sid, 0) + 1

    task = asyncio.create_task(ingest())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            async def sessions(k: int) -> None:
                async def create(i: int) -> str:
                    async with http.post(f"{ctl.api.url}/v1/sessions", json={"end_user_id": f"u{i}"},
                                         headers=auth) as r:
                        assert r.status == 201, await r.text()
                        sid: str = (await r.json())["session_id"]
                    async with http.post(f"{emu_url}/_emulator/sessions/{sid}/start") as r:
                        assert r.status == 200, await r.text()
                    return sid

                ids = [await create(i) for i in range(k)]  # one at a time: no pool of connections counted
                async with asyncio.timeout(60):
                    while not all(streams.get(sid) == 4 for sid in ids):
                        await asyncio.sleep(0.05)

            await sessions(warm)
            before = census()
            await sessions(n)
            after = census()
            ms = collect_ms()
    finally:
        await src.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()
        await ctl.close()
    added = after - before
    return {"per_session": (sum(after.values()) - sum(before.values())) / n,
            "by_type": {k: v / n for k, v in added.most_common(40)}, "objects": sum(after.values()),
            "collect_ms": ms}


def _scenario(path: Path, seconds: int) -> Path:
    """bench/sessions.py's 4 rtstreams, every one with an event each second from 0.1 s on (all 4 stream soon)."""
    scenario(path, 0)
    head = orjson.loads(path.read_bytes().splitlines()[0])
    head["end"] = seconds + 1
    events = [{"at": t + 0.1, "channel": "transcript" if r["media_types"] == ["audio"] else "visual_index",
               "rtstream": r["name"], "span": 1, "text": f"segment {t} on {r['name']}"}
              for t in range(seconds) for r in head["rtstreams"]]
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in (head, *events)))
    return path


def measure(n: int, warm: int = 10) -> dict[str, Any]:
    """Tracked objects each of `n` sessions adds (and the full-collection time with them in the heap)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scn = _scenario(tmp / "scenario.jsonl", 600)
        log = tmp / "emulator.log"
        with open(log, "wb") as fh:
            emu = subprocess.Popen([sys.executable, "-m", "pipeline.emulator.cli", "--manual", "--scenario",
                                    str(scn), "--api-key", API_KEY], stdout=fh, stderr=subprocess.STDOUT)
        try:
            url = _wait_line(log, r"EMULATOR_URL=(\S+)", emu)
            return asyncio.run(_measure(url, n, warm, tmp))
        finally:
            from tests.procs import stop_process

            stop_process(emu, timeout=10)


if __name__ == "__main__":
    import json

    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=1))
