"""Reloading a running pipeline whose config moves, changes or removes a `window` stage.

A window stage keeps its open windows in stage state named after its position (`stages[0]:window`). A reload
that put a filter in front of it started a fresh window stage at `stages[1]` and the open windows were never
emitted; removing the stage or changing its options also dropped them without a word (and left them in
state.db). Now a moved stage keeps its open windows; a removed or changed one closes them at the reload and
their `metrics` go out with the next batch, once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

T0 = 1_699_999_920_000  # ms, a multiple of both 60 s and 120 s

SOURCE = '''
import asyncio

from pipeline.api import Options, Source


class FedOptions(Options):
    pass


class Fed(Source):
    """Yields the batches a test puts in `QUEUE` (None ends it)."""

    name = "fed"
    Options = FedOptions
    QUEUE: "asyncio.Queue[list | None] | None" = None

    async def batches(self):
        while True:
            batch = await Fed.QUEUE.get()
            if batch is None:
                return
            yield batch

    async def stop(self):
        Fed.QUEUE.put_nowait(None)
'''


def config(tmp_path: Path, stages: str) -> str:
    return f"""name: win
source: {{type: "fed_src:Fed"}}
stages:
{stages}
sinks:
  - {{type: jsonl, path: {tmp_path / "out.jsonl"}, flush_interval: 0}}
"""


WINDOW = "  - {type: window, size: 60s, key: [k]}\n"
FILTER = "  - {type: filter, channels: [transcript, metrics]}\n"


def event(s: int) -> dict[str, Any]:
    return {"channel": "transcript", "k": "a", "unix_ts": (T0 + s * 1000) / 1000,
            "data": {"text": f"word at {s}", "start": T0 + s * 1000}}


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / "out.jsonl"
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def start_fed(p: Path, maxsize: int = 0) -> tuple[Any, Any, Any, asyncio.Task[int]]:
    """The pipeline of config file `p` (its source fed through `fed.QUEUE`) running with a reloader:
    (fed source class, runtime, reloader, run task)."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    cfg = load_config(p)
    fed: Any = cfg.source.cls
    fed.QUEUE = asyncio.Queue(maxsize=maxsize)
    rt = LocalRuntime(build(cfg), install_signals=False)
    rt.reloader = reloader = Reloader(rt, p, cfg)
    return fed, rt, reloader, asyncio.create_task(rt.run())


async def run_with_reload(tmp_path: Path, after: str) -> list[dict[str, Any]]:
    """Events at 0, 10, 20 s under one window stage; reload to `after`; an event at 61 s; stop. Everything out."""

    (tmp_path / "fed_src.py").write_text(SOURCE)
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, WINDOW))
    fed, _, reloader, task = start_fed(p)

    async def until(n: int) -> None:
        for _ in range(200):
            if len(lines(tmp_path)) >= n:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {n} lines out, got {lines(tmp_path)}")

    fed.QUEUE.put_nowait([event(0), event(10), event(20)])
    await until(3)
    p.write_text(config(tmp_path, after))
    assert await reloader.reload("test")
    fed.QUEUE.put_nowait([event(61)])
    await until(4)
    fed.QUEUE.put_nowait(None)
    assert await asyncio.wait_for(task, 10) == 0
    out = lines(tmp_path)
    assert sum(1 for e in out if e["channel"] == "transcript") == 4  # none lost, none twice
    return [e for e in out if e["channel"] == "metrics"]


def counts(metrics: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(start, end) relative to T0 in seconds, and the transcript count, of each metrics event."""
    return [((m["window"]["start"] - T0) // 1000, (m["window"]["end"] - T0) // 1000,
             m["data"]["events"].get("transcript", 0)) for m in metrics]


async def test_a_window_stage_moved_by_a_reload_keeps_its_open_windows(tmp_path: Path) -> None:
    metrics = await run_with_reload(tmp_path, FILTER + WINDOW)
    assert counts(metrics) == [(0, 60, 3), (60, 120, 1)]


async def test_a_removed_window_stage_emits_its_open_windows_once(tmp_path: Path) -> None:
    metrics = await run_with_reload(tmp_path, FILTER)
    assert counts(metrics) == [(0, 60, 3)]


async def test_a_window_stage_whose_options_change_closes_its_windows_at_the_reload(tmp_path: Path) -> None:
    metrics = await run_with_reload(tmp_path, WINDOW.replace("60s", "120s"))
    assert counts(metrics) == [(0, 60, 3), (0, 120, 1)]  # the old windows as they were; the new size afresh


async def test_a_moved_window_stages_state_is_saved_under_its_new_place(tmp_path: Path) -> None:
    """After the move, state.db holds the open windows under the stage's new label (what a run restarted after
    a crash reads back) and nothing under the old one (a window stage put there later must not inherit them)."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader
    from pipeline.state.store import open_store

    (tmp_path / "fed_src.py").write_text(SOURCE)
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, WINDOW))
    cfg = load_config(p)
    state = open_store(tmp_path / "state")
    rt = LocalRuntime(build(cfg, state=state), install_signals=False)
    rt.b.chain([event(0), event(10)])
    state.flush()
    p.write_text(config(tmp_path, FILTER + WINDOW))
    assert await Reloader(rt, p, cfg).reload("test")
    restarted = open_store(tmp_path / "state")
    try:
        moved = restarted.get("window:stages[1]:window")
        assert [acc["events"] for k, acc in moved.items() if k.startswith("[")] == [{"transcript": 2}]
        assert not restarted.get("window:stages[0]:window")
    finally:
        restarted.close()
        state.close()


async def test_reloads_under_load_lose_and_repeat_no_event(tmp_path: Path) -> None:
    """30 reloads while 10,000 events stream through: sinks re-created (flush_interval changes), processors
    shuffled, window stages added, moved and removed. Every event reaches each sink exactly once."""
    import random


    (tmp_path / "fed_src.py").write_text(SOURCE)
    rng = random.Random(7)

    def cfg(i: int) -> str:
        stages = [FILTER, f"  - {{type: rules, rules: [{{name: r{i % 2}, keywords: [w{i % 5}]}}]}}\n", WINDOW]
        rng.shuffle(stages)
        return f"""name: load
source: {{type: "fed_src:Fed"}}
stages:
{''.join(stages[: 1 + i % 3])}
sinks:
  - {{type: jsonl, path: {tmp_path}/a.jsonl, flush_interval: {["0", "50ms", "1s"][i % 3]}, channels: [transcript]}}
  - {{type: jsonl, path: {tmp_path}/b.jsonl, flush_interval: 0}}
runtime: {{queue_size: 2}}
"""

    p = tmp_path / "p.yaml"
    p.write_text(cfg(0))
    fed, _, reloader, task = start_fed(p, maxsize=4)
    n = 10_000

    reloaded = asyncio.Event()

    async def feed() -> None:
        for b in range(0, n, 50):
            await fed.QUEUE.put([{**event(i // 10), "seq": i, "data": {"text": f"w{i % 5} x", "start": T0 + i * 100}}
                                 for i in range(b, b + 50)])
        await reloaded.wait()  # the source ends after the last reload (a later one is ignored: the run finishes)
        await fed.QUEUE.put(None)

    async def reloads() -> None:
        for i in range(1, 31):
            p.write_text(cfg(i))
            assert await reloader.reload(f"r{i}")
            await asyncio.sleep(0.01)
        reloaded.set()

    await asyncio.gather(feed(), reloads())
    assert await asyncio.wait_for(task, 60) == 0
    for name in ("a", "b"):
        seqs = [json.loads(x).get("seq") for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert sorted(s for s in seqs if s is not None) == list(range(n)), name


def test_a_sighup_after_the_final_flush_is_ignored_and_the_windows_stay_counted(tmp_path: Path) -> None:
    """A replay ends: the final flush closes the open windows and their metrics go out, while a slow sink keeps
    the run finishing. A SIGHUP then (the window's size changed) was applied to the finished chain: the window
    stage was replaced by an empty one, whose counters the summary showed ("windows 0" for 5 emitted), and
    what such a reload closes could no longer go out with a next batch. Now it is ignored with one line."""
    import signal
    import subprocess
    import sys
    import threading

    from tests.procs import stop_process

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(event(s)) + "\n" for s in range(0, 300, 5)))
    hold = tmp_path / "slow.txt.hold"
    hold.touch()

    def cfg(window: str) -> str:
        return f"""name: win
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 10}}
stages:
{window}sinks:
  - {{type: jsonl, path: {tmp_path / "out.jsonl"}, flush_interval: 0}}
  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/slow.txt, delay: 0}}
"""

    p = tmp_path / "p.yaml"
    p.write_text(cfg(WINDOW))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(p)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True)
    reader.start()

    def until(cond: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline and proc.poll() is None, f"{what}: {''.join(err)}"
            time.sleep(0.02)

    try:  # the last window [240 s, 300 s) closes only at the final flush
        until(lambda: sum(e["channel"] == "metrics" for e in lines(tmp_path)) == 5, "the final flush")
        p.write_text(cfg(WINDOW.replace("60s", "30s")))
        proc.send_signal(signal.SIGHUP)
        until(lambda: any("reload (SIGHUP)" in ln for ln in err), "the reload's log line")
        hold.unlink()
        assert proc.wait(20) == 0, "".join(err)
    finally:
        stop_process(proc)
    reader.join(10)
    out = lines(tmp_path)
    assert [m["data"]["events"]["transcript"] for m in out if m["channel"] == "metrics"] == [12] * 5
    assert sum(e["channel"] == "transcript" for e in out) == 60
    reloads = [ln for ln in err if "reload (SIGHUP)" in ln]
    assert len(reloads) == 1 and "reload (SIGHUP) ignored: the run is finishing" in reloads[0], "".join(err)
    window = next(ln for ln in err if "stages[0]:window" in ln)
    assert "windows 5" in window, "".join(err)


async def test_a_reload_under_way_when_the_source_ends_is_applied_before_the_final_flush(tmp_path: Path) -> None:
    """The reload waits for a stalled sink it re-creates while the source ends. The final flush used to run
    at once, through the processors the reload was replacing, and the reload was applied to the finished run
    afterwards (logged as applied, yet its filter never saw the closed windows). Now the final flush waits for
    it and goes through the new processors."""

    (tmp_path / "fed_src.py").write_text(SOURCE)
    hold = tmp_path / "slow.txt.hold"
    hold.touch()

    def cfg(stages: str, delay: float) -> str:
        return config(tmp_path, stages) + \
            f'  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/slow.txt, delay: {delay}}}\n'

    p = tmp_path / "p.yaml"
    p.write_text(cfg(WINDOW, 0))
    fed, rt, reloader, task = start_fed(p)

    async def until(cond: Any) -> None:
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    fed.QUEUE.put_nowait([event(0), event(10), event(20)])
    await until(lambda: len(lines(tmp_path)) == 3)
    p.write_text(cfg(WINDOW + "  - {type: filter, channels: [transcript]}\n", 0.001))  # metrics no more
    reload = asyncio.create_task(reloader.reload("test"))
    await until(lambda: not rt.gate.is_set())  # swapping: waits for the stalled sink to drain
    fed.QUEUE.put_nowait(None)
    await until(fed.QUEUE.empty)
    hold.unlink()
    assert await asyncio.wait_for(reload, 10)
    assert await asyncio.wait_for(task, 10) == 0
    assert [e["channel"] for e in lines(tmp_path)] == ["transcript"] * 3  # the window's metrics were filtered
    assert (tmp_path / "slow.txt").read_text().split() == ["3"]


async def test_a_moved_window_stage_counts_the_whole_run_once(tmp_path: Path) -> None:
    """A window stage moved by a reload (a filter added in front) started its in/out counts again (the summary
    said `in 1` after 4 events), and must count its windows once: the move itself carries them over."""
    (tmp_path / "fed_src.py").write_text(SOURCE)
    p = tmp_path / "p.yaml"
    p.write_text(config(tmp_path, WINDOW))
    fed, rt, reloader, task = start_fed(p)
    fed.QUEUE.put_nowait([event(0), event(10), event(61)])  # the first window closes: one metrics event
    for _ in range(200):
        if any(e["channel"] == "metrics" for e in lines(tmp_path)):
            break
        await asyncio.sleep(0.02)
    p.write_text(config(tmp_path, FILTER + WINDOW))
    assert await reloader.reload("test")
    fed.QUEUE.put_nowait([event(125)])  # the second window closes
    fed.QUEUE.put_nowait(None)
    assert await asyncio.wait_for(task, 10) == 0
    window = rt.b.chain.processors[1]
    st = window.context.stats
    metrics = [e for e in lines(tmp_path) if e["channel"] == "metrics"]
    assert (st.name, st.received, st.report_of(window)["windows"]) == ("stages[1]:window", 4, len(metrics)), \
        (st, st.report_of(window), metrics)
