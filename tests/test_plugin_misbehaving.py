"""A plugin processor that breaks its contract costs only the events it gets wrong, never the run.

Real `pipeline run` processes with a plugin module beside the config (`type: misfit:Name`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from pipeline.api import Processor


class ReturnsNone(Processor):
    def process(self, batch):
        return None


class ReturnsGenerator(Processor):
    def process(self, batch):
        return (e for e in batch)


class ReturnsOneDict(Processor):
    def process(self, batch):
        return batch[0]


class AddsNonEvents(Processor):
    def process(self, batch):
        return [1, "x", None, *batch]


class FlushesNone(Processor):
    def process(self, batch):
        return batch

    def flush(self):
        return (e for e in [{"channel": "transcript", "id": -1}])


class FailsToStart(Processor):
    def __init__(self, options, context):
        raise RuntimeError("no GPU here\\nsecond line")


class ExitsToStart(Processor):
    def __init__(self, options, context):
        import sys
        sys.exit(0)


class Exits(Processor):
    def process(self, batch):
        import sys
        if any(e["id"] == 300 for e in batch):
            sys.exit(0)
        return batch

    def flush(self):
        import sys
        sys.exit("flushing")
'''

SOURCES = '''
from pipeline.api import Source


class NonEvents(Source):
    async def batches(self):
        yield [{"channel": "transcript", "id": 1}, 5, None, "x", {"channel": "transcript", "id": 2}]
        yield {"channel": "transcript", "id": 3}
        yield (e for e in [{"channel": "transcript", "id": 4}])
        yield [{"channel": "transcript", "id": 5}]

    async def stop(self):
        pass
'''


def _run(tmp_path: Path, cls: str, sink_channels: str = "") -> tuple[subprocess.CompletedProcess[str], list, list]:
    (tmp_path / "misfit.py").write_text(PLUGIN)
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "id": i, "data": {"text": f"t {i}"}}) + b"\n" for i in range(600)))
    (tmp_path / "p.yaml").write_text(f"""
name: misfit
source: {{type: replay, path: in.jsonl, batch_size: 256}}
stages: [{{type: "misfit:{cls}"}}]
sinks: [{{type: jsonl, path: out.jsonl{sink_channels}}}]
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def lines(name: str) -> list:
        p = tmp_path / name
        return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []

    return res, lines("out.jsonl"), lines("dead.jsonl")


@pytest.mark.parametrize("cls", ["ReturnsNone", "ReturnsGenerator", "ReturnsOneDict"])
def test_a_processor_that_returns_no_list_has_its_events_dead_lettered(tmp_path: Path, cls: str) -> None:
    """It used to end the run (exit 1, `ingest: TypeError: object of type 'NoneType' has no len()`) with the
    batch read and neither written nor dead-lettered; a dict returned alone was taken as its keys."""
    res, out, dead = _run(tmp_path, cls)
    assert res.returncode == 0, res.stderr
    assert out == []
    assert sorted(d["event"]["id"] for d in dead) == list(range(600))
    assert all("not a list of events" in d["reason"] and d["stage"] == f"stages[0]:misfit:{cls}" for d in dead)
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("channels", ["", ", channels: [transcript]"])
def test_non_events_among_a_processors_output_are_dead_lettered_alone(tmp_path: Path, channels: str) -> None:
    """Non-dicts reached the sinks: written as `1`, `"x"`, `null` lines, or (a sink with `channels:`) ending
    the run on `'int' object has no attribute 'get'` with the batch lost."""
    res, out, dead = _run(tmp_path, "AddsNonEvents", channels)
    assert res.returncode == 0, res.stderr
    assert [e["id"] for e in out] == list(range(600))
    assert len(dead) == 3 * 3  # three non-events per batch, three batches
    assert all("among its events, not an event" in d["reason"] for d in dead)
    assert [d.get("event") for d in dead[:3]] == [1, "x", None]


def test_a_flush_that_returns_no_list_is_counted_and_the_run_ends_cleanly(tmp_path: Path) -> None:
    res, out, _ = _run(tmp_path, "FlushesNone")
    assert res.returncode == 0, res.stderr
    assert [e["id"] for e in out] == list(range(600))
    assert "flush raised TypeError: flush() returned generator, not a list of events" in res.stderr
    assert "errors 1" in res.stderr


def test_a_plugin_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    res, _, _ = _run(tmp_path, "FailsToStart")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "pipeline: stages[0]:misfit:FailsToStart: cannot start: RuntimeError: no GPU here"]


def test_a_plugin_that_calls_sys_exit_while_it_is_made_is_one_line(tmp_path: Path) -> None:
    """Before: `pipeline run` ended at once with exit code 0 and printed nothing."""
    res, _, _ = _run(tmp_path, "ExitsToStart")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["pipeline: stages[0]:misfit:ExitsToStart: cannot start: called "
                                               "sys.exit(0)"]


def test_a_processor_that_calls_sys_exit_costs_only_the_event_it_was_given(tmp_path: Path) -> None:
    """Before: sys.exit(0) in process() ended `pipeline run` with exit code 0, no summary, the batches read
    neither written nor dead-lettered (256 of 600 written). Now it is an error like any other: the batch is
    retried event by event, the event it exits on is dead-lettered, and the run goes on."""
    res, out, dead = _run(tmp_path, "Exits")
    assert res.returncode == 0, res.stderr
    assert [e["id"] for e in out] == [i for i in range(600) if i != 300]
    assert [(d["event"]["id"], d["reason"]) for d in dead] == [(300, "SystemExit: 0")]
    assert "flush raised SystemExit: flushing" in res.stderr and "Traceback" not in res.stderr
    assert "written    599" in res.stderr, res.stderr


EXITING_SINK = '''
import sys
from pipeline.api import Sink


class ExitingSink(Sink):
    async def write(self, batch):
        if any(e["id"] >= 300 for e in batch):
            sys.exit(0)
'''


def test_a_sink_that_calls_sys_exit_is_a_failed_sink_not_a_clean_end(tmp_path: Path) -> None:
    """Before: sys.exit(0) in a sink's write() ended `pipeline run` with exit code 0 and no summary: the batches
    read and not yet written were neither written nor dead-lettered. Now the sink has failed, as if it raised:
    the run stops with one line and exit code 1, and every event read that it did not write is dead-lettered."""
    (tmp_path / "exiting_sink.py").write_text(EXITING_SINK)
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "id": i, "data": {"text": f"t {i}"}}) + b"\n" for i in range(600)))
    (tmp_path / "p.yaml").write_text("""
name: exits
source: {type: replay, path: in.jsonl, batch_size: 100}
sinks: [{type: "exiting_sink:ExitingSink"}]
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1, res.stderr
    assert "sinks[0]:exiting_sink:ExitingSink: write failed: SystemExit: 0" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    dead = [orjson.loads(x)["event"]["id"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    read = int(res.stderr.split("source:replay")[1].split()[1])  # it stops reading once the sink failed
    assert dead == list(range(300, read)), res.stderr  # each event read: written (the first 300) or dead-lettered


EXITING_SOURCE = '''
import sys
from pipeline.api import Source


class ExitingSource(Source):
    async def batches(self):
        yield [{"channel": "transcript", "id": 1}]
        yield [{"channel": "transcript", "id": 2}]
        sys.exit(0)

    async def stop(self):
        pass
'''


def test_a_source_that_calls_sys_exit_is_a_failed_source_not_a_clean_end(tmp_path: Path) -> None:
    """Before: sys.exit(0) in a source's batches() ended `pipeline run` with exit code 0, a traceback and no
    summary, what it had yielded perhaps unwritten. Now the source has failed, as if it raised: one line, exit
    code 1, and what it yielded is written."""
    (tmp_path / "exiting_source.py").write_text(EXITING_SOURCE)
    (tmp_path / "p.yaml").write_text("""
name: exits
source: {type: "exiting_source:ExitingSource"}
sinks: [{type: jsonl, path: out.jsonl}]
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "called sys.exit(0)" in res.stderr, res.stderr
    assert [orjson.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_bytes().splitlines()] == [1, 2]


def test_a_source_plugin_that_yields_non_events_costs_only_those(tmp_path: Path) -> None:
    """A non-dict in a source's batch ended the run (exit 1) with the batch lost; a batch that is not a list
    too (`KeyError: -1`, `object of type 'generator' has no len()`)."""
    (tmp_path / "feed.py").write_text(SOURCES)
    (tmp_path / "p.yaml").write_text("""
name: feed
source: {type: "feed:NonEvents"}
sinks: [{type: jsonl, path: out.jsonl, channels: [transcript]}]
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert [orjson.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_bytes().splitlines()] == [1, 2, 5]
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert [d["reason"] for d in dead] == [
        "batches() returned int among its events, not an event (a JSON object)",
        "batches() returned NoneType among its events, not an event (a JSON object)",
        "batches() returned str among its events, not an event (a JSON object)",
        "batches() returned dict, not a list of events",
        "batches() returned generator, not a list of events"]
    assert dead[3]["event"] == {"channel": "transcript", "id": 3}


def test_a_processor_swapped_in_by_a_reload_is_checked_too(make_context, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.api import Options, Processor
    from pipeline.build import Chain
    from pipeline.deadletter import DeadLetter

    class Nothing(Processor):
        def process(self, batch):  # type: ignore[no-untyped-def]
            return None

    chain = Chain([], DeadLetter(tmp_path / "dead.jsonl"))
    chain.processors = [Nothing(Options(), make_context())]
    assert chain([{"channel": "transcript", "id": 1}]) == []
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert [(d["reason"], d["event"]["id"]) for d in dead] == [
        ("TypeError: process() returned NoneType, not a list of events", 1)]
