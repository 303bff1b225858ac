"""Hostile inputs and crashed runs against real files, sockets, the test broker and a real HTTP server.

Each test reproduces one way bad input or a crash used to break the README's Guarantees.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api import Context
from pipeline.build import build
from pipeline.config import load_config
from pipeline.deadletter import DeadLetter
from pipeline.errors import StageError
from pipeline.events import MAX_DEPTH, MAX_ID_CHARS, edge_reason, too_deep
from pipeline.files import ensure_private_dir, open_private
from pipeline.runtime.local import LocalRuntime
from stages.processors.enrich import Enrich, EnrichOptions
from stages.sinks.alert_forwarder import AlertForwarder, AlertForwarderOptions
from stages.sinks.jsonl import JsonlOptions, JsonlSink
from tests.broker import kafka_broker  # noqa: F401
from tests.webhook_server import WebhookServer

MakeCtx = Callable[..., Context]


def nested(depth: int) -> Any:
    """A JSON value `depth` levels deep (`{}` is 1)."""
    value: Any = {}
    for i in range(depth - 1):
        value = {"a": value} if i % 2 else [value]
    return value


def ev(i: int, **extra: Any) -> dict[str, Any]:
    return {"channel": "transcript", "rtstream_id": "rts-1", "id": i,
            "data": {"text": f"line {i}", "is_final": True, "start": i}, **extra}


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def run_config(tmp_path: Path, body: str) -> LocalRuntime:
    p = tmp_path / "p.yaml"
    p.write_text(body)
    return LocalRuntime(build(load_config(p)), install_signals=False)


# -- 1. nesting deeper than the serialisers can write --------------------------------------------

def test_edge_reason_limits_depth_and_ids() -> None:
    ok = {"channel": "x", "data": nested(MAX_DEPTH - 1)}
    deep = {"channel": "x", "data": nested(MAX_DEPTH)}
    assert not too_deep(ok) and too_deep(deep)
    assert edge_reason(orjson.dumps(ok), ok) is None
    assert edge_reason(orjson.dumps(deep), deep) == f"nested deeper than {MAX_DEPTH} levels"
    assert edge_reason(orjson.dumps(deep).decode(), deep) == f"nested deeper than {MAX_DEPTH} levels"
    long_id = {"rtstream_id": "r" * (MAX_ID_CHARS + 1)}
    assert f"rtstream_id of {MAX_ID_CHARS + 1} characters" in str(edge_reason(orjson.dumps(long_id), long_id))
    name = {"rtstream_name": "n" * 600}
    assert "rtstream_name of 600 characters" in str(edge_reason(orjson.dumps(name), name))
    listed = {"event": "capture_session.active", "capture_session_id": "c",
              "data": {"rtstreams": [{"rtstream_id": "x" * 600}]}}
    assert "data.rtstreams[].rtstream_id" in str(edge_reason(orjson.dumps(listed), listed))
    odd = {"capture_session_id": ["x"] * 200}
    assert edge_reason(orjson.dumps(odd), odd) == f"capture_session_id of 801 characters exceeds {MAX_ID_CHARS}"
    assert edge_reason(orjson.dumps(odd), {**odd, "capture_session_id": 12345678901234567890}) is None


async def test_replay_dead_letters_deep_events_and_every_sink_writes_the_rest(tmp_path: Path) -> None:
    """Before: both jsonl sinks failed (Recursion limit reached), exit 1, and the dead letter raised too."""
    rows = [orjson.dumps(ev(i)) for i in range(10)]
    deep300 = b'{"channel":"transcript","data":' + b"[" * 300 + b"]" * 300 + b"}"
    deep1000 = b'{"channel":"transcript","data":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}"
    long_id = orjson.dumps(ev(99, rtstream_id="r" * 1000))
    rows[3:3] = [deep300]
    rows[7:7] = [deep1000, long_id]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    rt = run_config(tmp_path, f"""
name: deep
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 4}}
sinks:
  - {{type: jsonl, path: {tmp_path}/a.jsonl}}
  - {{type: jsonl, path: {tmp_path}/b.jsonl}}
dead_letter: {tmp_path}/dead.jsonl
""")
    assert await rt.run() == 0, rt.error
    for name in ("a", "b"):
        assert [e["id"] for e in lines(tmp_path / f"{name}.jsonl")] == list(range(10))
    dead = lines(tmp_path / "dead.jsonl")
    assert [(d["origin"]["line"], d["reason"]) for d in dead] == [
        (4, f"nested deeper than {MAX_DEPTH} levels"), (8, f"nested deeper than {MAX_DEPTH} levels"),
        (9, f"rtstream_id of 1000 characters exceeds {MAX_ID_CHARS}")]


async def test_websocket_deep_frame_and_invalid_utf8_text_frame_are_dead_lettered(tmp_path: Path) -> None:
    """Before: a 300-deep frame killed the jsonl sink; an invalid-UTF-8 text frame closed the socket (1007)."""
    import websockets

    hold = asyncio.Event()
    frames: list[tuple[bytes, bool]] = [(orjson.dumps(ev(i)), True) for i in range(6)]
    frames[2:2] = [(b'{"channel":"transcript","data":' + b"[" * 300 + b"]" * 300 + b"}", True),
                   (b'{"channel":"transcript","data":{"text":"caf\xe9"}}', True)]  # latin-1, not UTF-8

    async def handler(ws: Any) -> None:
        await ws.send('{"connection_id": "conn-1"}')
        for data, text in frames:
            await ws.send(data, text=text)
        await hold.wait()

    server = await websockets.serve(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rt = run_config(tmp_path, f"""
name: ws
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 30s}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0.05s}}]
dead_letter: {tmp_path}/dead.jsonl
""")
    task = asyncio.create_task(rt.run())
    try:
        for _ in range(200):
            if len(lines(tmp_path / "out.jsonl")) == 6 or task.done():
                break
            await asyncio.sleep(0.02)
        assert rt.b.source.connection_id == "conn-1"  # type: ignore[attr-defined]
        await rt.stop()
        assert await asyncio.wait_for(task, 10) == 0, rt.error
    finally:
        hold.set()
        server.close()
    assert [e["id"] for e in lines(tmp_path / "out.jsonl")] == list(range(6))
    reasons = [d["reason"] for d in lines(tmp_path / "dead.jsonl")]
    assert reasons[0] == f"nested deeper than {MAX_DEPTH} levels"
    assert reasons[1].startswith("not JSON") and "UTF-8" in reasons[1]
    assert len(reasons) == 2


async def test_kafka_source_dead_letters_a_deep_record_instead_of_crashing_on_it(
        kafka_broker: Any, make_context: MakeCtx) -> None:  # noqa: F811
    """Before: the record reached the sinks and crashed the run at the same offset on every restart."""
    from stages.sources.kafka import KafkaSource, KafkaSourceOptions
    from tests.test_kafka_source import produce

    values = [orjson.dumps(ev(i)) for i in range(20)]
    values[5:5] = [b'{"channel":"x","data":' + b"[" * 500 + b"]" * 500 + b"}"]
    await produce(kafka_broker.bootstrap, "deep", values, partitions=1)
    ctx = make_context("kafka-in")
    src = KafkaSource(KafkaSourceOptions(bootstrap_servers=kafka_broker.bootstrap, topic="deep", group="gd",
                                         session_timeout="1s"), ctx)
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        async for batch in src.batches():
            seen.extend(batch)
            if len(seen) == 20:
                await src.stop()
    await src.close()
    assert [e["id"] for e in seen] == list(range(20))
    dead = lines(ctx.dead_letter.path)
    assert [(d["reason"], d["origin"]["offset"]) for d in dead] == [(f"nested deeper than {MAX_DEPTH} levels", 5)]


async def test_enrich_leaves_a_too_deep_json_text_unparsed(make_context: MakeCtx, tmp_path: Path) -> None:
    """Before: data.json made the event 255+ levels deep and the jsonl sink failed on it."""
    text = '{"k":' + "[" * 400 + "]" * 400 + "}"
    events = [{"channel": "visual_index", "data": {"text": text}},
              {"channel": "visual_index", "data": {"text": '{"ok": [1]}'}}]
    out = Enrich(EnrichOptions(), make_context()).process(events)
    assert "json" not in out[0]["data"] and out[1]["data"]["json"] == {"ok": [1]}
    sink = JsonlSink(JsonlOptions(path=str(tmp_path / "o.jsonl")), make_context())
    await sink.start()
    await sink.write(out)
    await sink.close()
    assert len(lines(tmp_path / "o.jsonl")) == 2


async def test_jsonl_sink_dead_letters_only_the_event_it_cannot_encode(make_context: MakeCtx,
                                                                      tmp_path: Path) -> None:
    """A plugin may build what JSON cannot hold; before, the whole batch failed and the dead letter raised."""
    for path in ("plain.jsonl", "{channel}.jsonl"):
        ctx = make_context("jsonl")
        sink = JsonlSink(JsonlOptions(path=str(tmp_path / path)), ctx)
        await sink.start()
        await sink.write([ev(0), ev(1, data=nested(600)), ev(2, bad={1: 2}), ev(3)])
        await sink.close()
        out = tmp_path / ("plain.jsonl" if path == "plain.jsonl" else "transcript.jsonl")
        assert [e["id"] for e in lines(out)] == [0, 3]
        ctx.dead_letter.close()
        dead = lines(ctx.dead_letter.path)[-2:]
        assert ["'id': 1" in dead[0]["event_repr"], "'id': 2" in dead[1]["event_repr"]] == [True, True]
        assert all("cannot encode as JSON" in d["reason"] for d in dead)
        assert ctx.stats.errors == 2


def test_dead_letter_keeps_an_unencodable_event_as_its_repr(tmp_path: Path) -> None:
    dl = DeadLetter(tmp_path / "d.jsonl")
    dl.write("why", stage="s", event={"data": nested(300)})
    dl.write("why", stage="s", event={1: "int key"})
    dl.close()
    got = lines(tmp_path / "d.jsonl")
    assert len(got) == 2 and dl.count == 2
    assert "Recursion limit" in got[0]["reason"] and got[0]["event_repr"].startswith("{'data': [")
    assert got[1]["event_repr"] == "{1: 'int key'}"


async def test_alert_forwarder_dead_letters_an_alert_it_cannot_encode(make_context: MakeCtx) -> None:
    """Before: the alert vanished (neither delivered nor dead-lettered) and the run exited 0."""
    server = await WebhookServer().start()
    try:
        ctx = make_context("alerts")
        sink = AlertForwarder(AlertForwarderOptions(url=server.url(), shutdown_timeout="10s"), ctx)
        await sink.start()
        good = {"channel": "alert", "data": {"event_label": "ok", "timestamp": 1, "text": "fine"}}
        bad = {"channel": "alert", "data": {"event_label": "deep", "timestamp": 2, "text": "x",
                                            "extra": nested(300)}}
        await sink.write([good, bad])
        await sink.close()
    finally:
        await server.stop()
    assert [r.json["alert"]["data"]["event_label"] for r in server.requests] == ["ok"]
    dead = lines(ctx.dead_letter.path)
    assert len(dead) == 1 and "cannot encode the webhook body" in dead[0]["reason"]
    assert (sink.delivered, sink.dead_lettered) == (1, 1)


# -- 4. appending after a crash mid-line -----------------------------------------------------------

@pytest.mark.parametrize("which", ["jsonl", "dead_letter"])
async def test_append_after_a_partial_last_line_starts_a_new_line(tmp_path: Path, which: str) -> None:
    """`kill -9` mid-write leaves a partial line; before, the next run glued its first event onto it."""
    (tmp_path / "in.jsonl").write_bytes(orjson.dumps(ev(1)) + b"\nnot json\n")
    target = tmp_path / ("out.jsonl" if which == "jsonl" else "dead.jsonl")
    target.write_bytes(orjson.dumps(ev(0)) + b"\n" + b'{"channel":"transcript","id":9')
    rt = run_config(tmp_path, f"""
name: restart
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/dead.jsonl
""")
    assert await rt.run() == 0
    raw = target.read_bytes().splitlines()
    assert raw[1] == b'{"channel":"transcript","id":9'  # the partial line stays what it was
    appended = orjson.loads(raw[2])
    assert appended.get("id") == 1 or appended.get("reason", "").startswith("not JSON")


async def test_listen_events_file_starts_on_a_line_boundary(tmp_path: Path) -> None:
    (tmp_path / "f.jsonl").write_bytes(b'{"a": 1}\n{"b"')
    with open_private(tmp_path / "f.jsonl") as fh:
        fh.write(b'{"c": 3}\n')
    assert (tmp_path / "f.jsonl").read_bytes() == b'{"a": 1}\n{"b"\n{"c": 3}\n'
    with open_private(tmp_path / "f.jsonl") as fh:  # already on a boundary: nothing added
        fh.write(b'{"d": 4}\n')
    assert (tmp_path / "f.jsonl").read_bytes().endswith(b'{"c": 3}\n{"d": 4}\n')


# -- 10-12. directories, symlinks, the dead-letter path --------------------------------------------

def test_every_created_directory_is_0700(tmp_path: Path) -> None:
    """Before: `mkdir(parents=True)` made the intermediate directories 0755."""
    old = os.umask(0o022)
    try:
        with open_private(tmp_path / "deep1/a/b/c/e.jsonl") as fh:
            fh.write(b"{}\n")
        ensure_private_dir(tmp_path / "d2/x/y")
    finally:
        os.umask(old)
    for d in ("deep1", "deep1/a", "deep1/a/b", "deep1/a/b/c", "d2", "d2/x", "d2/x/y"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d


def test_a_symlink_above_the_parent_is_refused(tmp_path: Path) -> None:
    """Before: `top -> victim` with path `top/sub/x` wrote into `victim/sub`."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "top").symlink_to(victim)
    with pytest.raises(StageError, match="top: refusing a symlinked directory"):
        open_private(tmp_path / "top/sub/x.jsonl")
    with pytest.raises(StageError, match="top: refusing a symlinked directory"):
        ensure_private_dir(tmp_path / "top/sub")
    assert list(victim.iterdir()) == []


async def test_a_symlink_swapped_in_mid_run_is_refused(tmp_path: Path, make_context: MakeCtx) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    ctx = make_context("jsonl")
    sink = JsonlSink(JsonlOptions(path=f"{tmp_path}/top/sub/{{channel}}.jsonl", flush_interval=0), ctx)
    await sink.start()
    await sink.write([ev(0)])
    (tmp_path / "top").rename(tmp_path / "top-old")
    (tmp_path / "top").symlink_to(victim)
    with pytest.raises(StageError, match="refusing a symlinked directory"):
        await sink.write([{**ev(1), "channel": "visual_index"}])
    with pytest.raises(StageError, match="refusing a symlinked directory"):  # the sink stays failed
        await sink.close()
    assert list(victim.iterdir()) == []
    assert [e["id"] for e in lines(tmp_path / "top-old/sub/transcript.jsonl")] == [0]


async def test_an_unusable_dead_letter_path_fails_at_start(tmp_path: Path) -> None:
    """Before: the run started, and the first reject killed it, taking that batch's good events along."""
    (tmp_path / "in.jsonl").write_bytes(orjson.dumps(ev(0)) + b"\nnot json\n" + orjson.dumps(ev(1)) + b"\n")
    (tmp_path / "file").write_text("")
    rt = run_config(tmp_path, f"""
name: dl
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/file/dead.jsonl
""")
    assert await rt.run() == 1
    assert str(rt.error) == (f"{tmp_path}/file/dead.jsonl: cannot write the dead-letter file: {tmp_path}/file: "
                             "cannot create directory: Not a directory")
    assert rt.b.source.context.stats.received == 0  # nothing was read
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl/dead.jsonl").symlink_to(tmp_path / "elsewhere")
    rt = run_config(tmp_path, f"""
name: dl
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/dl/dead.jsonl
""")
    assert await rt.run() == 1 and "refusing to write through a symlink" in str(rt.error)
    assert not (tmp_path / "elsewhere").exists()


def test_pipeline_run_with_unusable_dead_letter_is_one_line(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "in.jsonl").write_bytes(orjson.dumps(ev(0)) + b"\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "p.yaml").write_text(f"""
name: dl
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/file/dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert any(ln.startswith("pipeline:") and "file" in ln for ln in res.stderr.splitlines()), res.stderr
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_bytes() == b""


async def test_kafka_sink_dead_letters_an_event_it_cannot_encode(
        kafka_broker: Any, make_context: MakeCtx) -> None:  # noqa: F811
    """Before: the sink dead-lettered it, but the dead-letter write raised too and the batch failed."""
    from stages.sinks.kafka import KafkaSink, KafkaSinkOptions
    from tests.broker import read_records

    ctx = make_context("kafka-out")
    sink = KafkaSink(KafkaSinkOptions(bootstrap_servers=kafka_broker.bootstrap, topic="deep-out"), ctx)
    await sink.start()
    await sink.write([ev(0), ev(1, data=nested(300)), ev(2)])
    await sink.close()
    got = await read_records(kafka_broker.bootstrap, ["deep-out"], expect=2)
    assert sorted(orjson.loads(r.value)["id"] for r in got) == [0, 2]
    dead = lines(ctx.dead_letter.path)
    assert len(dead) == 1 and "not JSON-serializable" in dead[0]["reason"] and "'id': 1" in dead[0]["event_repr"]
