"""Reload without restarting: a running pipeline on the emulator picks up a new rule by SIGHUP and
by --watch, re-creates a changed sink, keeps its WebSocket and capture session, and ignores an invalid edit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import stop_process

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def scenario(path: Path) -> Path:
    events = [{"at": round(0.5 + i * 0.2, 2), "channel": "transcript", "rtstream": "mic:default",
               "text": f"apple and banana, line {i}"} for i in range(200)]
    path.write_text(json.dumps({"name": "fruit", "end": 45, "rtstreams": [
        {"rtstream_id": "rts-mic", "name": "mic:default", "media_types": ["audio"], "type": "mic"}],
        "events": events}))
    return path


def config(url: str, out: Path, rules: str, events_file: str = "events.jsonl") -> str:
    return f"""name: reload
videodb: {{api_key: test-key, base_url: "{url}"}}
source: {{type: videodb}}
controller: {{type: capture_session, end_user_id: u1, state_dir: {out}, on_active: {{transcript: true}}}}
stages:
  - type: rules
    rules:
{rules}
sinks:
  - {{type: jsonl, path: {out}/alerts.jsonl, channels: [alert], flush_interval: 0}}
  - {{type: jsonl, path: {out}/{events_file}, flush_interval: 0}}
"""


APPLE = "      - {name: apple, keywords: [apple], channels: [transcript]}"
BANANA = APPLE + "\n      - {name: banana, keywords: [banana], channels: [transcript]}"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    proc = subprocess.Popen([*CLI, "emulate", "--speed", "1", "--scenario", str(scenario(tmp_path / "s.json"))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("EMULATOR_URL="), line
    yield line.strip().partition("=")[2]
    proc.send_signal(signal.SIGINT)
    proc.wait(10)


def labels(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(x)["data"]["event_label"] for x in path.read_text().splitlines() if x.strip()]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def calls(url: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{url}/_emulator/calls", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", ["sighup", "watch"])
def test_new_rule_by_reload_fires_on_later_events_without_a_new_session(
        tmp_path: Path, emulator: str, how: str) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(config(emulator, out, APPLE))
    log = (tmp_path / "stderr.log").open("w+")
    proc = subprocess.Popen([*CLI, "run", str(cfg), *(["--watch"] if how == "watch" else [])],
                            stdout=subprocess.DEVNULL, stderr=log, env=ENV, cwd=tmp_path)
    try:
        alerts = out / "alerts.jsonl"
        wait_for(lambda: "apple" in labels(alerts), "the first rule to fire")
        assert "banana" not in labels(alerts)

        def reload(text: str) -> None:
            before = Path(log.name).read_text().count("reload (")
            cfg.write_text(text)
            if how == "sighup":
                proc.send_signal(signal.SIGHUP)
            wait_for(lambda: Path(log.name).read_text().count("reload (") > before, "the reload log line")

        reload(config(emulator, out, BANANA, events_file="events2.jsonl"))
        assert "applied: 1 processor(s); sinks re-created: sinks[1]" in Path(log.name).read_text()
        wait_for(lambda: "banana" in labels(alerts), "the new rule to fire")
        wait_for(lambda: (out / "events2.jsonl").exists() and (out / "events2.jsonl").stat().st_size > 0,
                 "the re-created sink to write")
        old_events = (out / "events.jsonl").read_text()
        assert old_events.endswith("\n")  # flushed and closed whole

        reload(config(emulator, out, BANANA.replace("keywords: [banana]", "keyword: [banana]")))
        text = Path(log.name).read_text()
        assert "rejected, the running config stays" in text and "did you mean 'keywords'" in text
        n = labels(alerts).count("banana")
        wait_for(lambda: labels(alerts).count("banana") > n + 2, "the running rules to keep firing")
        assert (out / "events.jsonl").read_text() == old_events  # the old sink stays closed
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    text = Path(log.name).read_text()
    assert code == 0, text
    assert "reloads: 1 applied, 1 rejected" in text
    # across the sink swap no event was lost or written twice: the old file then the new one, in order
    def lines_in(name: str) -> list[int]:
        events = [json.loads(x) for x in (out / name).read_text().splitlines()]
        return [int(e["data"]["text"].rsplit(" ", 1)[1]) for e in events if e.get("channel") == "transcript"]

    before, after = lines_in("events.jsonl"), lines_in("events2.jsonl")
    assert before and after, (before, after)
    assert before + after == list(range(before[0], before[0] + len(before) + len(after)))
    made = calls(emulator)
    assert sum(c["method"] == "GET" and str(c["path"]).endswith("/websocket") for c in made) == 1
    assert sum(c["method"] == "POST" and str(c["path"]).endswith("/capture/session") for c in made) == 1


def test_sighup_without_changes_does_not_stop_a_run(tmp_path: Path) -> None:
    """SIGHUP (also: the terminal closing) used to kill the process at once with exit 129."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: h\nsource: {{type: replay, path: {fifo}}}\n"
                   f"sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl}}]\n")
    proc = subprocess.Popen([*CLI, "run", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            text=True, cwd=tmp_path)
    with open(fifo, "w") as w:
        w.write('{"channel": "transcript", "data": {"text": "one"}}\n')
        w.flush()
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        w.write('{"channel": "transcript", "data": {"text": "two"}}\n')
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    # The replay reads the FIFO in the event loop: the SIGHUP is seen once the read returns, by then after
    # the last line (ignored: the run is finishing) or before it (applied); either way it was handled
    assert "received SIGHUP" not in err
    assert "reload (SIGHUP) applied" in err or "reload (SIGHUP) ignored: the run is finishing" in err, err
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_sighup_with_http_on_the_command_line_reports_no_runtime_change(tmp_path: Path) -> None:
    """`pipeline run --http ADDR` overrides runtime.http; a SIGHUP with the file unchanged compared the file's
    runtime (no http) with the running one and logged `needs a restart, not applied: runtime`."""
    cfg = tmp_path / "p.yaml"  # a source that keeps retrying a closed port: the run waits, its loop free
    cfg.write_text("name: h\nsource: {type: websocket, url: 'ws://127.0.0.1:9', backoff_initial: 1s}\n"
                   f"sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl}}]\n")
    log = tmp_path / "err.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*CLI, "run", str(cfg), "--http", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV, cwd=tmp_path)
    try:
        wait_for(lambda: "operator endpoint" in log.read_text(), "the operator endpoint")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload (SIGHUP)" in log.read_text(), "the reload's log line")
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "reload (SIGHUP) applied" in text, text
    assert "needs a restart" not in text, text


RULES_CFG = """name: state
source: {{type: replay, path: none.jsonl}}
stages:
  - type: rules
    rules:
      - {{name: apple, keywords: [{kw}], cooldown: 10m}}
{extra}
sinks: [{{type: jsonl, path: {out}}}]
"""


def _apple_reloader(tmp_path: Path) -> tuple[Path, Path, Any, Any, Callable[[int], list[str]]]:
    """A local runtime on RULES_CFG's apple rule and its reloader; fired(s): the alert labels of one
    "apple pie" transcript at s seconds."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    p = tmp_path / "p.yaml"
    out = tmp_path / "o.jsonl"
    p.write_text(RULES_CFG.format(kw="apple", extra="", out=out))
    cfg = load_config(p)
    rt = LocalRuntime(build(cfg), install_signals=False)

    def fired(at_s: int) -> list[str]:
        batch = [{"channel": "transcript", "rtstream_id": "r", "data": {"text": "apple pie", "start": at_s * 1000}}]
        return [e["data"]["event_label"] for e in rt.b.chain(batch) if e.get("channel") == "alert"]

    return p, out, rt, Reloader(rt, p, cfg), fired


async def test_rule_state_carries_over_only_for_unchanged_rules(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    p, out, rt, reloader, fired = _apple_reloader(tmp_path)

    assert fired(0) == ["apple"]
    p.write_text(RULES_CFG.format(kw="apple", extra="      - {name: pie, keywords: [pie]}", out=out))
    assert await reloader.reload("test")
    assert fired(60) == ["pie"]  # apple's cooldown (10m from 0 s) survived the reload
    p.write_text(RULES_CFG.format(kw="apple, pear", extra="      - {name: pie, keywords: [pie]}", out=out))
    assert await reloader.reload("test")
    assert fired(120) == ["apple", "pie"]  # apple's matching changed: its state starts afresh
    p.write_text("name: state\nsource: {type: replay, path: other.jsonl}\n" + RULES_CFG.split("\n", 2)[2].format(
        kw="apple", extra="", out=out))
    caplog.clear()
    caplog.set_level("INFO", logger="pipeline.reload")
    assert await reloader.reload("test")
    assert reloader.current.source.options.path.endswith("none.jsonl")  # type: ignore[attr-defined]
    assert "reload (test) applied: 1 processor(s); needs a restart, not applied: source" in caplog.text
    p.write_text(RULES_CFG.format(kw="apple", extra="", out=out).replace("name: state", "name: renamed"))
    assert await reloader.reload("test")
    assert "not applied: name, dead_letter, state_dir" in caplog.text and reloader.current.name == "state"
    rt.reloader = reloader  # the metrics endpoint counts reloads by outcome
    p.write_text("name: state\nsources: oops\n")
    assert not await reloader.reload("test")
    from pipeline.http.metrics import exposition, registry_for
    from pipeline.http.view import View

    text = exposition(registry_for(View(rt.b, rt))).decode()
    assert 'videodb_pipeline_config_reloads_total{outcome="applied",pipeline="state"} 4.0' in text
    assert 'videodb_pipeline_config_reloads_total{outcome="rejected",pipeline="state"} 1.0' in text


async def test_watch_reloads_a_file_written_in_two_steps_once_whole(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`--watch` polls the file: one poll between the two writes of a save saw half a config and rejected it
    (or, cut at a line, applied half the rules and dropped the rest's cooldowns). It waits for the file to
    settle, then applies the whole file once."""
    import asyncio

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime import reload
    from pipeline.runtime.local import LocalRuntime

    monkeypatch.setattr(reload, "WATCH_INTERVAL", 0.05)
    monkeypatch.setattr(reload, "WATCH_SETTLE", 0.4, raising=False)
    p = tmp_path / "p.yaml"
    out = tmp_path / "o.jsonl"
    p.write_text(RULES_CFG.format(kw="apple", extra="", out=out))
    cfg = load_config(p)
    rt = LocalRuntime(build(cfg), install_signals=False)
    reloader = reload.Reloader(rt, p, cfg, watch=True)
    task = asyncio.create_task(reloader.run())
    try:
        whole = RULES_CFG.format(kw="apple", extra="      - {name: pie, keywords: [pie]}", out=out)
        cut = whole.index("keywords: [pie]")
        with p.open("w") as fh:  # a writer that is slow between its two writes
            fh.write(whole[:cut])
            fh.flush()
            await asyncio.sleep(0.2)
            fh.write(whole[cut:])
        for _ in range(60):
            if reloader.applied or reloader.rejected:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert (reloader.applied, reloader.rejected) == (1, 0)
        assert [r.name for r in reloader.current.stages[0].options.rules] == ["apple", "pie"]  # type: ignore[attr-defined]
    finally:
        task.cancel()


def test_sighup_while_starting_or_finishing_is_not_fatal(tmp_path: Path) -> None:
    """A reload sent a moment too early (the run still importing, reading its config, starting sinks) or too
    late (writing its summary, or in the interpreter's shutdown, which puts back the default action of every
    signal Python handles) used to end the process: SIGHUP's default action. It reloads, or is ignored."""
    events = tmp_path / "in.jsonl"
    events.write_text("".join(json.dumps({"channel": "transcript", "unix_ts": 1_700_000_000 + i,
                                          "data": {"text": f"apple {i}"}}) + "\n" for i in range(40)))
    cfg = tmp_path / "p.yaml"
    many = ", ".join(f"word{i}" for i in range(5000))  # a config that takes a while to build
    cfg.write_text(f"""name: hup
source: {{type: replay, path: {events}, speed: 20}}
stages: [{{type: rules, rules: [{{name: apple, keywords: [apple]}}, {{name: many, keywords: [{many}]}}]}}]
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
""")
    proc = subprocess.Popen([*CLI, "run", str(cfg), "--summary-json", str(tmp_path / "summary.json")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # past the interpreter's own start-up (nothing can catch a signal there): reading the config loads pydantic
    maps = Path(f"/proc/{proc.pid}/maps")
    wait_for(lambda: proc.poll() is not None or "pydantic_core" in maps.read_text(), "the config being read",
             timeout=20)
    summary = tmp_path / "summary.json"
    while proc.poll() is None:  # a storm, until the process is gone (its interpreter's own shutdown included)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.002 if summary.exists() else 0.01)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "reload (SIGHUP) applied" in err and summary.exists()
    assert sum(1 for _ in (tmp_path / "out.jsonl").open()) == 80  # every event and its alert, once


async def test_a_changed_sink_buffer_is_reported_as_needing_a_restart(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A sink's `buffer:` belongs to the runtime, which a reload does not rebuild: switching it to `disk`
    re-created the sink, logged the reload as applied and recorded `disk` as running, while batches still
    waited in memory (a `kill -9` then lost what the operator had just made durable). Now it is one of the
    changes that need a restart, and the rest of the sink's change still applies."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.buffers import MemoryBuffer
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    p = tmp_path / "p.yaml"
    body = "name: buf\nsource: {{type: replay, path: {src}}}\nsinks:\n  - {{type: jsonl, path: {out}{extra}}}\n"
    p.write_text(body.format(src=tmp_path / "in.jsonl", out=tmp_path / "o.jsonl", extra=""))
    cfg = load_config(p)
    rt = LocalRuntime(build(cfg), install_signals=False)
    reloader = Reloader(rt, p, cfg)
    caplog.set_level("INFO", logger="pipeline.reload")
    p.write_text(body.format(src=tmp_path / "in.jsonl", out=tmp_path / "o.jsonl",
                             extra=", flush_interval: 0, buffer: {type: disk}"))
    assert await reloader.reload("test")
    assert "sinks re-created: sinks[0]; needs a restart, not applied: sinks[0].buffer" in caplog.text
    assert reloader.current.sinks[0].options.buffer.type == "memory"  # type: ignore[attr-defined]
    assert reloader.current.sinks[0].options.flush_interval == 0  # type: ignore[attr-defined]
    assert isinstance(rt.buffers[0], MemoryBuffer) and rt.b.sinks[0].buffer.type == "memory"
    caplog.clear()
    assert await reloader.reload("test")  # the same file again: the buffer is still the one change not applied
    assert "needs a restart, not applied: sinks[0].buffer" in caplog.text and "re-created" not in caplog.text


async def test_a_reload_that_restarts_a_rule_forgets_its_saved_cooldown_at_once(tmp_path: Path) -> None:
    """A reload dropped a changed rule's cooldown in memory only; state.db kept it until some later batch
    changed state. Killed (-9) before one, the restarted run read the old cooldown back: the changed rule
    stayed silent for the rest of the old cooldown."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader
    from pipeline.state.store import open_store

    p = tmp_path / "p.yaml"
    out = tmp_path / "o.jsonl"
    p.write_text(RULES_CFG.format(kw="apple", extra="      - {name: pie, keywords: [pie], cooldown: 10m}", out=out))
    cfg = load_config(p)
    state = open_store(tmp_path / "state")
    rt = LocalRuntime(build(cfg, state=state), install_signals=False)
    reloader = Reloader(rt, p, cfg)
    rt.b.chain([{"channel": "transcript", "rtstream_id": "r", "data": {"text": "apple pie", "start": 1000}}])
    state.flush()  # as the runtime does after every batch
    p.write_text(RULES_CFG.format(kw="apple, pear", extra="      - {name: pie, keywords: [pie], cooldown: 10m}",
                                  out=out))
    assert await reloader.reload("test")
    restarted = open_store(tmp_path / "state")  # what a run restarted after kill -9 reads
    try:
        assert sorted(restarted.get("rules.last_fired")) == ["pie|r"]
    finally:
        restarted.close()
        state.close()


async def test_rule_state_carries_over_when_a_processor_is_added_before_the_rules(tmp_path: Path) -> None:
    """Rule state is kept for every rule whose name and matching are unchanged; a filter added in front of the
    rules stage moved it to stages[1], and every cooldown started afresh: each alert fired again at once."""
    p, out, _, reloader, fired = _apple_reloader(tmp_path)

    assert fired(0) == ["apple"]
    p.write_text(RULES_CFG.format(kw="apple", extra="", out=out).replace(
        "stages:\n", "stages:\n  - {type: filter, channels: [transcript]}\n"))
    assert await reloader.reload("test")
    assert fired(60) == []  # still inside apple's 10m cooldown


async def test_a_reload_of_a_config_read_from_a_named_pipe_is_refused_not_a_hang(tmp_path: Path) -> None:
    """`pipeline run FIFO` (a config written into a named pipe by a template tool) read its config once; a SIGHUP
    then opened the pipe again inside the event loop, which waits for a writer: the whole pipeline stopped, SIGTERM
    included. The reload is refused with the reason and the run goes on."""
    import asyncio
    import threading

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    plain = tmp_path / "p.yaml"
    plain.write_text(RULES_CFG.format(kw="apple", extra="", out=tmp_path / "o.jsonl"))
    cfg = load_config(plain)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    rt = LocalRuntime(build(cfg), install_signals=False)
    reloader = Reloader(rt, fifo, cfg, watch=True)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(reloader.reload("SIGHUP"))), daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # blocked in open() (a daemon thread: it does not hold the test run up)
        raise AssertionError("the reload blocked on the named pipe")
    assert result == [False] and reloader.rejected == 1
    assert reloader._file_digest() is None  # --watch does not open it either


def test_watch_reads_a_huge_config_file_only_up_to_the_size_limit(tmp_path: Path) -> None:
    """`--watch` hashed the whole file every second: a config replaced by a multi-GB file (a log written to the
    wrong path) was read whole into memory each time. It reads no more than a config may hold."""
    import tracemalloc

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    p = tmp_path / "p.yaml"
    p.write_text(RULES_CFG.format(kw="apple", extra="", out=tmp_path / "o.jsonl"))
    cfg = load_config(p)
    reloader = Reloader(LocalRuntime(build(cfg), install_signals=False), p, cfg, watch=True)
    with p.open("r+b") as fh:
        fh.truncate(64 << 20)  # sparse: costs no disk
    tracemalloc.start()
    try:
        assert reloader._file_digest() is not None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
