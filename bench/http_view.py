"""Benchmark: replay throughput with the operator endpoint on (/metrics scraped every second) and with a
/tap client attached at the source, each against the same replay with it off, in the same run.

Each side runs in a fresh interpreter (imports done before the clock); the three alternate, best of
`repeats` each (the machine is shared). The scrapes and the tap client run in this process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from bench.common import ROOT, Result, pipeline_config, ratio_result, rules_spec, workdir, write_config
from bench.gen import dataset

# Prints "ready <port>" once the endpoint is up, waits for a tap client if asked, then times the run.
_CHILD = """
import asyncio, sys, time
from pathlib import Path
import pipeline.build, pipeline.config, pipeline.runtime.local, pipeline.http.attach
from pipeline.build import build
from pipeline.config import load_config
from pipeline.http.attach import operator_view
from pipeline.runtime.local import LocalRuntime

async def main():
    rt = LocalRuntime(build(load_config(sys.argv[1])), install_signals=False)
    async with operator_view(rt, rt.b):
        server = getattr(rt, "http_server", None)
        print("ready", server.port if server else 0, flush=True)
        if sys.argv[2] == "tap":
            while rt.tap_hub.client_count == 0:
                await asyncio.sleep(0.01)
        t0, c0 = time.perf_counter(), time.process_time()
        code = await rt.run()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        sent = sum(c.offered for cs in rt.tap_hub.clients.values() for c in cs)
        dropped = rt.tap_hub.dropped
    assert code == 0, code
    print(dt, rt.b.source.context.stats.received, dropped, sent, cpu, flush=True)

asyncio.run(main())
"""


def _scrape(port: int, stop: threading.Event, counter: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()
            counter[0] += 1
        except OSError:
            return


def _tap(port: int, counter: list[int]) -> None:
    """A client that keeps up: reads the stream in large chunks (the child counts what it sent)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/tap?at=source", timeout=60) as r:
            while chunk := r.read1(1 << 20):
                counter[0] += len(chunk)
                if b"event: end" in chunk:
                    return
    except OSError:
        return


def one(config: Path, mode: str) -> tuple[float, int, int, int, float]:
    """(seconds, events, tap events dropped, scrapes or tap events sent, CPU seconds) for one child run."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(config), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    stop = threading.Event()
    seen = [0]
    helper = None
    if mode == "on":
        helper = threading.Thread(target=_scrape, args=(port, stop, seen), daemon=True)
    elif mode == "tap":
        helper = threading.Thread(target=_tap, args=(port, seen), daemon=True)
    if helper is not None:
        helper.start()
    out, err = proc.communicate(timeout=900)
    stop.set()
    if helper is not None:
        helper.join(10)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {err.strip()[-2000:]}")
    secs, events, dropped, sent, cpu = out.split()
    return float(secs), int(events), int(dropped), int(sent) if mode == "tap" else seen[0], float(cpu)


def run(n: int, repeats: int = 5) -> list[Result]:
    src = dataset(n)
    out = workdir("http_view")
    configs = {}
    for mode in ("off", "on", "tap"):
        runtime = {"status_interval": 0}
        if mode != "off":
            runtime["http"] = "127.0.0.1:0"
        cfg = pipeline_config(f"bench-http-{mode}", {"type": "replay", "path": str(src)},
                              [{"type": "jsonl", "path": str(out / f"{mode}.jsonl"), "clear": True}], out,
                              rules=rules_spec(100, 20), runtime=runtime)
        configs[mode] = write_config(out / f"{mode}.yaml", cfg)
    best = {"off": 0.0, "on": 0.0, "tap": 0.0}
    per_cpu = {"off": 0.0, "on": 0.0, "tap": 0.0}  # events per CPU-second: less sensitive to a shared machine
    extra = {"on": 0, "tap": 0}
    dropped = 0
    for _ in range(repeats):
        for mode in ("off", "on", "tap"):
            secs, events, drops, seen, cpu = one(configs[mode], mode)
            per_cpu[mode] = max(per_cpu[mode], events / cpu)
            if events / secs > best[mode]:
                best[mode] = events / secs
                if mode != "off":
                    extra[mode] = seen
                if mode == "tap":
                    dropped = drops
    r1 = ratio_result(f"replay {n:,} events, --http on, /metrics scraped every 1s", best["on"], best["off"], 0.95,
                      "--http off")
    r1.notes.append(f"{extra['on']} scrapes during the best run; best of {repeats}, alternating, fresh processes; "
                    f"per CPU-second: {per_cpu['on'] / per_cpu['off']:.2f}x")
    r2 = ratio_result("replay with a /tap client at the source", best["tap"], best["off"], 0.9, "no tap")
    r2.notes.append(f"the client was sent {extra['tap']:,} events and missed {dropped:,} (its buffer was full); "
                    f"per CPU-second: {per_cpu['tap'] / per_cpu['off']:.2f}x")
    return [r1, r2]
