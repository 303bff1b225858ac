"""alert_forwarder delivery against a real local HTTP server: signing, retries, dead letters, storms."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api import Context
from pipeline.deadletter import DeadLetter
from stages.sinks.alert_forwarder import AlertForwarder, AlertForwarderOptions
from stages.sinks.alert_forwarder.idempotency import alert_key
from stages.sinks.alert_forwarder.signing import SIGNATURE_HEADER, verify
from tests.webhook_server import HANG, WebhookServer

SECRET = "whsec-alert-test-9f8e7d"
TOKEN = "T0KEN-s3cr3t-path"
FAST = {"backoff_initial": "0.05s", "backoff_max": "0.2s", "shutdown_timeout": "10s"}


def alert(i: int = 0, label: str = "code-on-screen", text: str = "User is editing Python code",
          ) -> dict[str, Any]:
    return {"channel": "alert", "origin": "rules", "rtstream_id": "rts-3", "rtstream_name": "display:1",
            "capture_session_id": "cap-1",
            "data": {"event_label": label, "timestamp": 1710000012340 + i * 1000, "text": f"{text} #{i}",
                     "severity": "warning", "matched": ["code"], "source_channel": "visual_index"}}


@pytest.fixture
async def server() -> AsyncIterator[WebhookServer]:
    srv = await WebhookServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
def make_sink(make_context: Callable[..., Context]) -> Callable[..., AlertForwarder]:
    def make(**options: Any) -> AlertForwarder:
        return AlertForwarder(AlertForwarderOptions(**options), make_context("alerts"))
    return make


def dead_letters(sink: AlertForwarder) -> list[dict[str, Any]]:
    path = sink.context.dead_letter.path
    sink.context.dead_letter.close()
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def run(sink: AlertForwarder, *batches: list[dict[str, Any]]) -> None:
    await sink.start()
    try:
        for batch in batches:
            await sink.write(batch)
    finally:
        await sink.close()


async def test_200_delivered_once_with_valid_signature(server: WebhookServer, make_sink: Any) -> None:
    sink = make_sink(url=server.url(), secret=SECRET, **FAST)
    event = alert()
    await run(sink, [event])
    assert len(server.requests) == 1
    req = server.requests[0]
    assert verify(SECRET.encode(), req.body, req.headers[SIGNATURE_HEADER], tolerance=60)
    assert not verify(b"wrong-secret", req.body, req.headers[SIGNATURE_HEADER])
    assert req.headers["Idempotency-Key"] == alert_key(event)
    assert req.headers["Content-Type"] == "application/json"
    assert req.json == {"type": "alert", "idempotency_key": alert_key(event), "alert": event}
    assert (sink.delivered, sink.dead_lettered, sink.digests) == (1, 0, 0)
    assert dead_letters(sink) == []


async def test_500_500_200_delivered_once_after_retries(server: WebhookServer, make_sink: Any) -> None:
    server.script = [500, 503, 200]
    sink = make_sink(url=server.url(), secret=SECRET, **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 3
    assert len({r.headers["Idempotency-Key"] for r in server.requests}) == 1
    assert len({r.body for r in server.requests}) == 1
    assert all(verify(SECRET.encode(), r.body, r.headers[SIGNATURE_HEADER]) for r in server.requests)
    assert (sink.delivered, sink.dead_lettered) == (1, 0)


async def test_429_retry_after_is_honoured(server: WebhookServer, make_sink: Any) -> None:
    server.script = [(429, {"Retry-After": "1"})]
    sink = make_sink(url=server.url(), **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 2
    # backoff alone would retry after <= 0.05 s; Retry-After asks for one second
    assert server.requests[1].at - server.requests[0].at >= 0.9
    assert sink.delivered == 1


async def test_a_503_with_a_malformed_retry_after_is_retried_not_dead_lettered(server: WebhookServer,
                                                                              make_sink: Any) -> None:
    """`Retry-After: ²` passed `str.isdigit()`, then float() raised: the alert was dead-lettered as an
    internal error on its first attempt instead of retried. A value that is not ASCII digits or an HTTP
    date is ignored (the backoff applies)."""
    server.script = [(503, {"Retry-After": "\u00b2"}), (503, {"Retry-After": "\u0663"})]
    sink = make_sink(url=server.url(), **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 3
    assert (sink.delivered, sink.dead_lettered) == (1, 0)


async def test_400_not_retried_and_dead_lettered(server: WebhookServer, make_sink: Any) -> None:
    server.script = [(400, {}, "invalid_payload")]
    sink = make_sink(url=server.url(), **FAST)
    event = alert()
    await run(sink, [event])
    assert len(server.requests) == 1
    (record,) = dead_letters(sink)
    assert record["status"] == 400 and record["attempts"] == 1
    assert record["reason"] == "HTTP 400: invalid_payload"
    assert record["event"] == event and record["idempotency_key"] == alert_key(event)
    assert record["stage"] == "alerts"
    assert (sink.delivered, sink.dead_lettered) == (0, 1)


async def test_alerts_a_full_dead_letter_file_leaves_out_are_not_counted_as_dead_lettered(
        server: WebhookServer, make_sink: Any) -> None:
    """Before, `dead-lettered 3` in the summary though the file (at its dead_letter_max_bytes) took none: the
    three alerts were counted twice, there and as not dead-lettered."""
    server.script = [(400, {}, "invalid_payload")] * 3
    sink = make_sink(url=server.url(), **FAST)
    path = sink.context.dead_letter.path
    path.write_bytes(b'{"old": 1}\n' * 100)
    sink.context.dead_letter = DeadLetter(path, max_bytes=1000)
    await run(sink, [alert(0)], [alert(1)], [alert(2)])
    assert len(server.requests) == 3 and path.stat().st_size == 1100
    assert (sink.delivered, sink.dead_lettered, sink.context.stats.errors) == (0, 0, 3)
    assert sink.context.dead_letter.full == 3


async def test_408_is_retried(server: WebhookServer, make_sink: Any) -> None:
    server.script = [408]
    sink = make_sink(url=server.url(), **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 2 and sink.delivered == 1


async def test_hanging_server_times_out_retries_then_dead_letters(
        server: WebhookServer, make_sink: Any) -> None:
    server.script = [HANG, HANG, HANG]
    sink = make_sink(url=server.url(), timeout="0.3s", max_attempts=2, **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 2
    (record,) = dead_letters(sink)
    assert record["reason"] == "timeout after 0.3s (gave up after 2 attempts)"
    assert record["attempts"] == 2 and record["status"] is None


async def test_max_retry_time_stops_retrying(server: WebhookServer, make_sink: Any) -> None:
    server.script = [(503, {"Retry-After": "30"})]
    sink = make_sink(url=server.url(), max_retry_time="5s", **FAST)
    await run(sink, [alert()])
    assert len(server.requests) == 1
    (record,) = dead_letters(sink)
    assert "max_retry_time 5s" in record["reason"] and record["status"] == 503


async def test_rate_limit_digest_folds_storm_and_loses_nothing(server: WebhookServer, make_sink: Any) -> None:
    sink = make_sink(url=server.url(), rate_limit="10/min", on_limit="digest", **FAST)
    events = [alert(i) for i in range(100)]
    await run(sink, events[:40], events[40:])
    singles = [r.json for r in server.requests if r.json["type"] == "alert"]
    digests = [r.json for r in server.requests if r.json["type"] == "digest"]
    assert len(server.requests) == 11  # the burst of 10, then one token for one digest
    assert len(singles) == 10 and len(digests) == 1
    digest = digests[0]
    assert digest["count"] == 90 and len(digest["alerts"]) == 90
    sent = [s["alert"] for s in singles] + digest["alerts"]
    assert sorted(e["data"]["timestamp"] for e in sent) == sorted(e["data"]["timestamp"] for e in events)
    assert set(digest["member_keys"]) == {alert_key(e) for e in events[10:]}
    digest_request = next(r for r in server.requests if r.json["type"] == "digest")
    assert digest_request.headers["Idempotency-Key"] == digest["idempotency_key"]
    assert (sink.delivered, sink.digests, sink.dead_lettered) == (100, 1, 0)


async def test_rate_limit_queue_waits_for_tokens(server: WebhookServer, make_sink: Any) -> None:
    sink = make_sink(url=server.url(), rate_limit="10/s", burst=1, on_limit="queue", **FAST)
    await run(sink, [alert(i) for i in range(4)])
    assert [r.json["type"] for r in server.requests] == ["alert"] * 4
    # one token per 0.1 s after the first: the last request cannot come before 0.3 s
    assert server.requests[-1].at - server.requests[0].at >= 0.25


async def test_same_key_sent_once(server: WebhookServer, make_sink: Any) -> None:
    sink = make_sink(url=server.url(), **FAST)
    await run(sink, [alert(1), alert(1), alert(2)], [alert(1)])
    assert len(server.requests) == 2
    assert sink.duplicates == 2 and sink.delivered == 2
    assert sink.context.stats.dropped == 2


async def test_every_url_gets_every_alert(make_sink: Any) -> None:
    first, second = await WebhookServer().start(), await WebhookServer(script=[500]).start()
    try:
        sink = make_sink(urls=[first.url("/a/tok1"), second.url("/b/tok2")], **FAST)
        await run(sink, [alert(1), alert(2)])
    finally:
        await first.stop()
        await second.stop()
    assert len(first.requests) == 2 and len(second.requests) == 3
    assert sink.delivered == 4


async def test_secret_and_url_token_never_logged_or_dead_lettered(
        server: WebhookServer, make_sink: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.script = [500, 500, (401, {}, "bad token")]
    sink = make_sink(url=server.url(), secret=SECRET, max_attempts=2, **FAST)
    refused = make_sink(url=f"http://127.0.0.1:9/x/{TOKEN}?key={TOKEN}", secret=SECRET, max_attempts=2,
                        **FAST)
    await run(sink, [alert(1)], [alert(2)])
    await run(refused, [alert(3)])
    refused.context.dead_letter.close()
    records = dead_letters(sink)  # both sinks share the test's dead-letter file
    assert len(records) == 2
    assert "connection error" in records[-1]["reason"]
    dead_text = Path(sink.context.dead_letter.path).read_text()
    for text in (caplog.text, dead_text, repr(records)):
        assert TOKEN not in text and SECRET not in text
    assert f"http://127.0.0.1:{server.port}/***" in caplog.text
    assert "retrying" in caplog.text and "dead-lettered" in caplog.text


async def test_slow_webhook_does_not_block_write_until_queue_full(
        server: WebhookServer, make_sink: Any) -> None:
    server.script = [HANG] * 20
    sink = make_sink(url=server.url(), timeout="30s", concurrency=1, queue_size=5, shutdown_timeout="0.3s")
    await sink.start()
    for i in range(5):
        await asyncio.wait_for(sink.write([alert(i)]), 2)  # accepted at once despite the hung request
    await asyncio.sleep(0.2)  # one request in flight, one alert waiting for the concurrency slot
    blocked = asyncio.create_task(sink.write([alert(i) for i in range(5, 15)]))
    await asyncio.sleep(0.3)
    assert not blocked.done()  # backpressure: the queue is full, write waits
    blocked.cancel()
    await sink.close()
    records = dead_letters(sink)
    # 1 in flight + 1 held + queue_size 5, and the 8 the cancelled write never queued (once silently lost)
    assert sink.dead_lettered == len(records) == 15
    assert sum(r["reason"].startswith("shutdown: delivery still in progress") for r in records) == 1
    assert sum(r["reason"] == "shutdown: not queued before drain_timeout" for r in records) == 8
    assert len(server.requests) <= 1  # concurrency: 1


async def test_storm_digests_fit_digest_max_bytes_and_keep_order(make_sink: Any) -> None:
    """A json digest of a storm grew to about queue_bytes (13 MB for 30,415 alerts); a receiver capped at 1 MB
    (nginx's default) answered 413, not retried, and every alert of the digest was dead-lettered. A digest now
    takes the oldest alerts that fit `digest_max_bytes`; the rest wait for the next token. One alert bigger
    than the bound alone goes as it is (this receiver refuses it: only it is dead-lettered)."""
    bound = 8192
    srv = await WebhookServer(max_body=bound).start()
    try:
        events = [alert(i, text="x" * 900) for i in range(150)]
        big = alert(10_000, text="y" * (bound + 100))
        events.insert(70, big)
        sink = make_sink(url=srv.url(), rate_limit="200/s", burst=1, on_limit="digest", concurrency=1,
                         digest_max_bytes=f"{bound}", **FAST)
        encoded: list[tuple[str, ...]] = []  # the alerts of each body encoded, by key
        encode = sink._encode
        sink._encode = lambda alerts: encoded.append(tuple(a.key for a in alerts)) or encode(alerts)  # type: ignore[method-assign]
        await run(sink, events)
    finally:
        await srv.stop()
    assert sink.dead_lettered == 1  # was all 151: one digest of every waiting alert, refused with 413
    over = [r for r in srv.requests if len(r.body) > bound]
    assert [r.json["alert"] for r in over] == [big]  # the one alert bigger than the bound, alone
    ok = [r.json for r in srv.requests if len(r.body) <= bound]
    digests = [b for b in ok if b["type"] == "digest"]
    assert len(digests) > 10 and all(d["count"] == len(d["alerts"]) >= 2 for d in digests)
    got = [e for b in ok for e in ([b["alert"]] if b["type"] == "alert" else b["alerts"])]
    assert got == [e for e in events if e is not big]  # each once, in order
    for d in digests:
        assert d["member_keys"] == [alert_key(e) for e in d["alerts"]]
        assert encoded.count(tuple(d["member_keys"])) == 1  # measured to fit, then sent as measured (was twice)
    keys = [r.headers["Idempotency-Key"] for r in srv.requests if len(r.body) <= bound]
    assert keys == [b["idempotency_key"] for b in ok] and len(set(keys)) == len(keys)
    (record,) = dead_letters(sink)
    assert record["status"] == 413 and record["event"] == big
    assert (sink.delivered, sink.digests, sink.dead_lettered) == (150, len(digests), 1)


@pytest.mark.parametrize("fmt", ["slack", "discord", "template"])
async def test_chat_and_template_digests_fit_digest_max_bytes(make_sink: Any, fmt: str) -> None:
    """Slack and Discord digests are cut to their own character limits, but a character of screen text can take
    4 bytes (39 alerts of emoji text: a 9.4 KB Slack, 13 KB Discord body), and a template digest lists up to
    `digest_items` renders of any length (47 KB here): they too take only the oldest alerts whose body fits."""
    bound = 4096
    srv = await WebhookServer(max_body=bound).start()
    try:
        events = [alert(i, text="🚨" * 300) for i in range(40)]
        extra = {"template": "{data[text]}", "digest_items": 500} if fmt == "template" else {}
        sink = make_sink(url=srv.url(), format=fmt, rate_limit="200/s", burst=1, on_limit="digest",
                         concurrency=1, digest_max_bytes="4KiB", **extra, **FAST)
        await run(sink, events)
    finally:
        await srv.stop()
    assert (sink.delivered, sink.dead_lettered) == (40, 0), dead_letters(sink)
    assert all(len(r.body) <= bound for r in srv.requests)
    assert 2 <= sink.digests < len(srv.requests)  # the first alert alone, then digests of what fits
    if fmt == "template":  # each alert once, in order
        lines = [line for r in srv.requests for line in r.json["text"].splitlines() if "🚨" in line]
        assert lines == [f"{'🚨' * 300} #{i}" for i in range(40)]
