"""Benchmark 5: latency at 1,000 events/s over the WebSocket, receipt to alert forwarder and to jsonl.

The emulator (own process, speed 1) sends an event every millisecond; the
pipeline runs websocket -> filter -> enrich -> rules (20 rules, 100 keywords,
plus a probe rule without cooldown that fires on about one event in eight) ->
jsonl (`flush_interval: 0`, every batch handed to the OS at once) and
alert_forwarder (a local webhook). Receipt is when the source stamps an event;
"handed to the forwarder" is its `write()` call; "jsonl write" is when the
sink's `write()` has passed the line to the OS.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import Result, pipeline_config, rules_spec, workdir, write_config
from bench.emulated import emulator, scenario, start_session, ws_url
from bench.ws_ingest import _Probe

RATE = 1_000
TARGET_MS = 5.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _key(event: dict[str, Any]) -> str | None:
    data = event.get("data")
    text = data.get("text") if isinstance(data, dict) else None
    return text if isinstance(text, str) else None


async def _webhook() -> tuple[Any, str]:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


async def _measure(n: int, out: Path) -> tuple[list[float], list[float]]:
    import aiohttp

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    runner, hook = await _webhook()
    path = scenario(out / f"latency-{n}.jsonl", n, 1 / RATE, tag=True)
    rules = [*rules_spec(100), {"name": "probe", "keywords": ["password"], "severity": "info"}]
    try:
        async with aiohttp.ClientSession() as http, emulator(path, speed=1) as base:
            url = await ws_url(http, base)
            cfg = pipeline_config("bench-latency", {"type": "websocket", "url": url},
                                  [{"type": "jsonl", "path": str(out / "events.jsonl"), "clear": True,
                                    "flush_interval": 0},
                                   {"type": "alert_forwarder", "url": hook, "format": "json"}], out, rules=rules)
            built = build(load_config(write_config(out / "latency.yaml", cfg)))
            rt = LocalRuntime(built, install_signals=False)
            loop = asyncio.get_running_loop()
            received: dict[str, float] = {}
            probe = _Probe(built.source, lambda: loop.create_task(rt.stop()))
            stamp = probe._stamp

            def on_receipt(event: dict[str, Any]) -> dict[str, Any]:
                key = _key(event)
                if key is not None:
                    received[key] = time.perf_counter()
                    if len(received) == n:  # every probe event is in: no need to wait for the export
                        loop.create_task(rt.stop())  # noqa: RUF006 - the runtime finishes the work
                return stamp(event)  # type: ignore[no-any-return]

            probe._stamp = on_receipt
            to_jsonl: list[float] = []
            to_forwarder: list[float] = []
            jsonl, forwarder = built.sinks[0].sink, built.sinks[1].sink
            jsonl_write, forwarder_write = jsonl.write, forwarder.write

            async def timed_jsonl(batch: list[dict[str, Any]]) -> None:
                await jsonl_write(batch)
                now = time.perf_counter()
                to_jsonl.extend(now - received[k] for e in batch if (k := _key(e)) in received)

            async def timed_forwarder(batch: list[dict[str, Any]]) -> None:
                now = time.perf_counter()
                to_forwarder.extend(now - received[k] for e in batch if (k := _key(e)) in received)
                await forwarder_write(batch)

            jsonl.write, forwarder.write = timed_jsonl, timed_forwarder  # type: ignore[method-assign]

            setups: list[asyncio.Task[str]] = []

            async def bind(conn_id: str) -> None:
                setups.append(loop.create_task(start_session(http, base, conn_id)))

            built.session.on_connection(bind)
            code = await rt.run()
            for t in setups:
                t.result()
            if code != 0:
                raise RuntimeError(f"latency pipeline exited {code}: {rt.error}")
    finally:
        await runner.cleanup()
    if not to_jsonl or not to_forwarder:
        raise RuntimeError(f"no samples: {len(to_jsonl)} jsonl, {len(to_forwarder)} alerts")
    return [x * 1000 for x in to_jsonl], [x * 1000 for x in to_forwarder]


def run(n: int) -> list[Result]:
    n = max(500, min(n, 20_000))
    jsonl, alerts = asyncio.run(_measure(n, workdir("latency")))
    out = []
    for name, xs in (("receipt -> alert handed to forwarder", alerts), ("receipt -> jsonl write", jsonl)):
        p99 = percentile(xs, 99)
        res = Result(f"latency p99, {name}", p99, "ms", target=f"< {TARGET_MS:g} ms", ok=p99 < TARGET_MS)
        res.notes.append(f"p50 {percentile(xs, 50):.2f} ms, max {max(xs):.2f} ms over {len(xs):,} events "
                         f"at {RATE:,} ev/s")
        out.append(res)
    return out
