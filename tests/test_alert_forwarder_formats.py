"""alert_forwarder bodies (Slack, Discord, template), options validation, signing and TLS."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from pipeline.api import Context
from stages.sinks.alert_forwarder import AlertForwarder, AlertForwarderOptions
from stages.sinks.alert_forwarder.delivery import retry_after
from stages.sinks.alert_forwarder.signing import sign, verify
from stages.sinks.alert_forwarder.template import render
from tests.webhook_server import WebhookServer, self_signed

FAST = {"backoff_initial": "0.05s", "shutdown_timeout": "10s"}


def alert(i: int = 0, text: str = "User is editing Python code <!channel> & more") -> dict[str, Any]:
    return {"channel": "alert", "origin": "rules", "rtstream_id": "rts-3", "rtstream_name": "display:1",
            "capture_session_id": "cap-1",
            "data": {"event_label": "code-on-screen", "timestamp": 1710000012340 + i * 1000, "text": text,
                     "severity": "warning", "matched": ["code", "terminal"]}}


async def deliver(make_context: Callable[..., Context], events: list[dict[str, Any]],
                  **options: Any) -> list[Any]:
    """Run the sink against a real server and return the JSON bodies it received."""
    server = await WebhookServer().start()
    try:
        sink = AlertForwarder(AlertForwarderOptions(url=server.url(), **FAST, **options), make_context())
        await sink.start()
        await sink.write(events)
        await sink.close()
    finally:
        await server.stop()
    assert sink.dead_lettered == 0
    return [r.json for r in server.requests]


def assert_slack_shape(body: dict[str, Any]) -> None:
    """Incoming-webhook message: `text` fallback plus Block Kit header/section/context blocks."""
    assert isinstance(body["text"], str) and body["text"]
    blocks = body["blocks"]
    assert 1 <= len(blocks) <= 50
    assert blocks[0]["type"] == "header" and blocks[0]["text"]["type"] == "plain_text"
    assert len(blocks[0]["text"]["text"]) <= 150
    for block in blocks:
        assert block["type"] in {"header", "section", "context"}
        if block["type"] == "section":
            texts = [block["text"]] if "text" in block else block["fields"]
            assert texts and all(t["type"] == "mrkdwn" and len(t["text"]) <= 3000 for t in texts)
            assert len(block.get("fields", [])) <= 10
        if block["type"] == "context":
            assert 1 <= len(block["elements"]) <= 10
    assert "<!channel>" not in orjson.dumps(body).decode()  # untrusted text cannot ping everyone


def assert_discord_shape(body: dict[str, Any]) -> None:
    """Execute-webhook body: `content` plus one rich embed within Discord's limits; no mentions."""
    assert isinstance(body["content"], str) and len(body["content"]) <= 2000
    assert body["allowed_mentions"] == {"parse": []}
    (embed,) = body["embeds"]
    assert set(embed) <= {"title", "description", "fields", "timestamp", "color"}
    assert len(embed["title"]) <= 256 and len(embed["description"]) <= 4096
    assert isinstance(embed["color"], int) and 0 <= embed["color"] <= 0xFFFFFF
    assert datetime.fromisoformat(embed["timestamp"]).tzinfo is not None
    assert len(embed["fields"]) <= 25
    for f in embed["fields"]:
        assert set(f) == {"name", "value", "inline"} and f["name"] and f["value"]
        assert len(f["name"]) <= 256 and len(f["value"]) <= 1024 and isinstance(f["inline"], bool)


async def test_slack_body(make_context: Callable[..., Context]) -> None:
    (body,) = await deliver(make_context, [alert()], format="slack")
    assert_slack_shape(body)
    assert "code-on-screen (warning)" in body["blocks"][0]["text"]["text"]
    assert body["blocks"][1]["text"]["text"] == "User is editing Python code &lt;!channel&gt; &amp; more"
    fields = " ".join(f["text"] for f in body["blocks"][2]["fields"])
    assert "display:1" in fields and "cap-1" in fields and "2024-03-09T16:00:12.340Z" in fields
    assert body["text"].startswith("[warning] code-on-screen on display:1: ")


async def test_discord_body(make_context: Callable[..., Context]) -> None:
    (body,) = await deliver(make_context, [alert()], format="discord")
    assert_discord_shape(body)
    embed = body["embeds"][0]
    assert embed["title"] == "code-on-screen (warning)"
    assert embed["description"] == "User is editing Python code <!channel> & more"
    assert embed["timestamp"] == "2024-03-09T16:00:12.340Z"
    assert {f["name"]: f["value"] for f in embed["fields"]} == {
        "Stream": "display:1", "Session": "cap-1", "Matched": "code, terminal"}


@pytest.mark.parametrize("fmt", ["slack", "discord", "template"])
async def test_digest_bodies(make_context: Callable[..., Context], fmt: str) -> None:
    extra = {"template": "{data[event_label]}: {data[text]}"} if fmt == "template" else {}
    bodies = await deliver(make_context, [alert(i, f"text {i}") for i in range(3)], format=fmt,
                           rate_limit="1/s", on_limit="digest", **extra)
    assert len(bodies) == 2  # alert 0 alone, then alerts 1 and 2 folded into one digest
    digest = orjson.dumps(bodies[1]).decode()
    assert "2 alerts" in digest and "text 1" in digest and "text 2" in digest and "text 0" not in digest
    if fmt == "slack":
        assert_slack_shape(bodies[1])
    elif fmt == "discord":
        assert_discord_shape(bodies[1])
    else:
        assert bodies[1]["text"].splitlines()[1:] == ["code-on-screen: text 1", "code-on-screen: text 2"]


async def test_template_body(make_context: Callable[..., Context]) -> None:
    tpl = "{data[event_label]} on {rtstream_name}: {data[text]} [{missing}{data[nope][x]}] {data[matched][1]}"
    (body,) = await deliver(make_context, [alert(text="hi")], format="template", template=tpl)
    assert body == {"text": "code-on-screen on display:1: hi [] terminal"}


@pytest.mark.parametrize("tpl", ["{data.__class__}", "{data[text].__class__.__mro__}", "{0}", "{}",
                                 "{data[text]", "{x:{data.__class__}}"])
def test_template_attribute_access_rejected(tpl: str) -> None:
    with pytest.raises(ValidationError):
        AlertForwarderOptions(url="https://example.com/h", format="template", template=tpl)


def test_template_render_never_walks_attributes() -> None:
    assert render("{data[__class__]}|{data[text]!r}|{n:>4}", {"data": {"text": "x"}, "n": 7}) == "|'x'|   7"


@pytest.mark.parametrize(("options", "message"), [
    ({}, "set `url`"),
    ({"url": ""}, "empty"),
    ({"url": "ftp://host/x/TOKEN123"}, "expected an http(s) URL"),
    ({"url": "http://127.0.0.1:99999/x/TOKEN123"}, "the port must be a number from 1 to 65535"),  # was taken
    ({"url": "http://[::1/x/TOKEN123"}, "expected an http(s) URL such as https://hooks.slack.com/services/..., "
                                       "got 'http://***'"),
    ({"url": "https://h/x", "format": "template"}, "needs `template:`"),
    ({"url": "https://h/x", "template": "{x}"}, "only used with format: template"),
    ({"url": "https://h/x", "rate_limit": "lots"}, "expected a rate like 10/min"),
    ({"url": "https://h/x", "timeout": "soon"}, "expected a duration"),
    ({"url": "https://h/x", "retries": 3}, "Extra inputs are not permitted"),
    ({"url": "https://h/x", "digest_max_bytes": "4095"}, "digest_max_bytes must be at least 4KiB (got 4095 bytes"),
    ({"url": "https://h/x", "digest_max_bytes": "lots"}, "expected a size"),
])
def test_options_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AlertForwarderOptions(**options)
    assert message in str(info.value)
    assert all("TOKEN123" not in e["msg"] for e in info.value.errors())


def test_options_defaults() -> None:
    o = AlertForwarderOptions(url="https://hooks.example.com/services/T0/B0/abc", urls=["https://b/c"])
    assert o.channels == ["alert"] and o.format == "json" and o.timeout == 10.0
    assert o.destinations == ["https://hooks.example.com/services/T0/B0/abc", "https://b/c"]
    assert o.rate_limit is None and o.on_limit == "queue" and o.shutdown_timeout == 30.0
    assert o.digest_max_bytes == 1 << 20
    assert AlertForwarderOptions(url="https://h/x", digest_max_bytes="4KiB").digest_max_bytes == 4096


def test_signature_verification() -> None:
    body = b'{"type":"alert"}'
    header = sign(b"k3y", body, 1_700_000_000)
    assert verify(b"k3y", body, header, now=1_700_000_100)
    assert not verify(b"k3y", body + b" ", header, now=1_700_000_100)  # tampered body
    assert not verify(b"k3y", body, header, now=1_700_000_000 + 301)  # replay outside tolerance
    assert not verify(b"k3y", body, header.replace("t=1700000000", "t=1700000099"), now=1_700_000_100)
    assert not verify(b"k3y", body, "v1=abc", now=1_700_000_100)


def test_retry_after_parsing() -> None:
    assert retry_after("3") == 3.0
    assert retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412500.0) == 10.0
    assert retry_after("soon") is None and retry_after(None) is None


@pytest.mark.parametrize("trusted", [False, True])
async def test_tls_verification_stays_on(make_context: Callable[..., Context], tmp_path: Path,
                                         trusted: bool) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = await WebhookServer(ssl_context=tls).start()
    try:
        sink = AlertForwarder(AlertForwarderOptions(url=server.url(), ca_file=str(cert) if trusted else None,
                                                    **FAST), make_context())
        await sink.start()
        await sink.write([alert()])
        await sink.close()
    finally:
        await server.stop()
    if trusted:
        assert sink.delivered == 1 and len(server.requests) == 1
    else:  # self-signed and not trusted: refused, not retried, dead-lettered
        assert sink.dead_lettered == 1 and server.requests == []
        (record,) = [orjson.loads(x) for x in sink.context.dead_letter.path.read_bytes().splitlines()]
        assert record["reason"].startswith("TLS error") and record["attempts"] == 1


@pytest.mark.parametrize("tz", ["Asia/Tokyo", "America/Los_Angeles"])
def test_a_retry_after_date_without_a_zone_is_utc_whatever_the_local_time_zone(tz: str) -> None:
    """The asctime form and "-0000" (both HTTP-dates, always UTC) parse without a zone and were read as local
    time: 10 s read as 0 s in Tokyo and as 7 hours in Los Angeles (past max_retry_time: dead-lettered)."""
    code = ("from pipeline.retry_after import retry_after as r; "
            "print([r(d, now=1445412500.0) for d in ('Wed Oct 21 07:28:30 2015', 'Wed, 21 Oct 2015 07:28:30 -0000', "
            "'Wed, 21 Oct 2015 07:28:30 GMT', 'Wednesday, 21-Oct-15 07:28:30 GMT')])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "TZ": tz})
    assert res.stdout.strip() == "[10.0, 10.0, 10.0, 10.0]", res.stdout + res.stderr
