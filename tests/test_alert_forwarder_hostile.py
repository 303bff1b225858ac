"""alert_forwarder against hostile receivers and hostile alerts: real sockets, real HTTP, the real dead letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api import Context
from stages.sinks.alert_forwarder import AlertForwarder, AlertForwarderOptions
from stages.sinks.alert_forwarder.signing import sign, verify
from tests.test_alert_forwarder import FAST, alert, dead_letters, run
from tests.webhook_server import WebhookServer


@pytest.fixture
def make_sink(make_context: Callable[..., Context]) -> Callable[..., AlertForwarder]:
    def make(**options: Any) -> AlertForwarder:
        return AlertForwarder(AlertForwarderOptions(**options), make_context("alerts"))
    return make


class RawServer:
    """A TCP server speaking just enough HTTP/1.1 to answer each request with the next scripted bytes.

    A step is (head, then): `head` is written at once, then `then` says what happens to the connection:
    "hang" (keep it open, send nothing more) or "reset" (abort it, RST). Past the script: 200.
    """

    def __init__(self, script: list[tuple[bytes, str]]) -> None:
        self.script = script
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                if not self.script:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    continue
                raw, then = self.script.pop(0)
                writer.write(raw)
                await writer.drain()
                if then == "reset":
                    writer.transport.abort()
                    return
                await asyncio.sleep(3600)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.transport.abort()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/T0KEN-s3cr3t-path"


STALLED_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1000\r\n\r\n"  # the body never comes


@pytest.mark.parametrize("then", ["hang", "reset"])
async def test_a_5xx_whose_body_stalls_or_is_cut_is_retried(make_sink: Any, then: str) -> None:
    """A 503 (or 429) whose error body never arrives (a stalled proxy) or is cut by a reset: reading the
    300-byte snippet for the reason raised NameError (`aiohttp` was not imported there), so the alert was
    dead-lettered on its first attempt as an "internal error" with a traceback, instead of retried."""
    async with RawServer([(STALLED_503, then), (STALLED_503, then)]) as srv:
        sink = make_sink(url=srv.url(), timeout="0.5s", **FAST)
        await run(sink, [alert()])
        assert srv.requests == 3
    assert (sink.delivered, sink.dead_lettered) == (1, 0)
    assert dead_letters(sink) == []


async def test_a_5xx_whose_body_stalls_every_time_is_dead_lettered_with_the_status(make_sink: Any) -> None:
    async with RawServer([(STALLED_503, "hang")] * 3) as srv:
        sink = make_sink(url=srv.url(), timeout="0.3s", max_attempts=2, **FAST)
        await run(sink, [alert()])
        assert srv.requests == 2
    (record,) = dead_letters(sink)
    assert record["status"] == 503 and record["attempts"] == 2
    assert record["reason"].startswith("HTTP 503") and "internal error" not in record["reason"]


# -- the receiver's side of the signature ------------------------------------------------------

@pytest.mark.parametrize("header", [
    "t=\u00b2,v1=00",            # str.isdigit() takes a superscript two; int() does not
    "t=" + "9" * 5000 + ",v1=00",  # over int()'s 4300-digit limit
    "t=1000,v1=\u00e9",           # hmac.compare_digest refuses non-ASCII str
    "t=\u0661\u0660\u0660\u0660,v1=00",  # Arabic-Indic digits: int() reads 1000, they are not ASCII
])
def test_verify_says_false_for_hostile_headers_instead_of_raising(header: str) -> None:
    """`signing.verify` is the receiver's check (README): a forged header made it raise ValueError or
    TypeError, so a receiver using it answered 500 instead of rejecting the request."""
    assert verify(b"k", b"{}", header, now=1000.0) is False


def test_verify_still_accepts_the_real_signature() -> None:
    header = sign(b"k", b'{"a":1}', 1000)
    assert verify(b"k", b'{"a":1}', header, now=1000.0)
    assert not verify(b"k", b'{"a":2}', header, now=1000.0)


def _readme_verify() -> Callable[[bytes, bytes, str], bool]:
    """The `verify` snippet printed in README.md, executed as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("import hashlib, hmac, time\n\ndef verify(")
    code = readme[start:readme.index("```", start)]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # the documented snippet itself
    return scope["verify"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("header", ["t=\u00b2,v1=00", "t=1000,v1=\u00e9", "t=" + "9" * 5000 + ",v1=00"])
def test_the_readme_verify_snippet_rejects_hostile_headers(header: str) -> None:
    readme_verify = _readme_verify()
    assert readme_verify(b"k", b"{}", header) is False
    t = int(time.time())
    assert readme_verify(b"k", b"{}", sign(b"k", b"{}", t))


# -- alerts with event times no clock produces ---------------------------------------------------

def _bogus_time(i: int) -> dict[str, Any]:
    ev = alert(i)
    ev["data"]["timestamp"] = 10 ** 18  # a nanosecond clock, or garbage from a plugin
    return ev


@pytest.mark.parametrize("fmt", ["slack", "discord", "template"])
async def test_an_alert_with_an_absurd_event_time_is_still_delivered(make_sink: Any, fmt: str) -> None:
    """Formatting the event time raised OSError (year out of range): the alert was dead-lettered as
    "cannot encode the webhook body" instead of reaching Slack/Discord with the time shown as it came."""
    srv = await WebhookServer().start()
    try:
        extra = {"template": "{label} at {time}: {text}"} if fmt == "template" else {}
        sink = make_sink(url=srv.url(), format=fmt, **extra, **FAST)
        await run(sink, [_bogus_time(0)])
    finally:
        await srv.stop()
    assert (sink.delivered, sink.dead_lettered) == (1, 0), dead_letters(sink)
    body = srv.requests[0].json
    if fmt == "discord":  # the time shows only as the embed's timestamp, which must be ISO-8601 or absent
        assert "timestamp" not in body["embeds"][0]
    else:
        assert str(10 ** 18) in srv.requests[0].body.decode()


async def test_one_absurd_event_time_does_not_dead_letter_a_whole_json_digest(make_sink: Any) -> None:
    """A json digest of 30 alerts, one with an absurd time: building the digest failed, each alert alone
    encoded fine, so all 30 were dead-lettered ("only the combination fails")."""
    srv = await WebhookServer().start()
    try:
        sink = make_sink(url=srv.url(), rate_limit="2/s", burst=1, on_limit="digest", **FAST)
        events = [alert(i) for i in range(30)]
        events[7] = _bogus_time(7)
        await run(sink, events)
    finally:
        await srv.stop()
    assert (sink.delivered, sink.dead_lettered) == (30, 0), dead_letters(sink)
    assert [r.json["type"] for r in srv.requests] == ["alert", "digest"]
    assert srv.requests[1].json["count"] == 29



# -- Discord's documented limits, enforced by a receiver that answers 400 as Discord does -----------

DISCORD_LIMITS = {"title": 256, "description": 4096, "name": 256, "value": 1024}


def discord_refusal(body: dict[str, Any]) -> str | None:
    """Why Discord would answer 400 to this webhook body (its embed limits), or None."""
    if len(body.get("content", "")) > 2000:
        return "content over 2000"
    for embed in body.get("embeds", []):
        total = len(embed.get("title", "")) + len(embed.get("description", ""))
        for key in ("title", "description"):
            if len(embed.get(key, "")) > DISCORD_LIMITS[key]:
                return f"{key} too long"
        fields = embed.get("fields", [])
        if len(fields) > 25:
            return "more than 25 fields"
        for f in fields:
            if len(f["name"]) > 256 or len(f["value"]) > 1024:
                return "field too long"
            total += len(f["name"]) + len(f["value"])
        if total > 6000:
            return f"embed total {total} over 6000"
    return None


class DiscordLike(WebhookServer):
    """The local webhook server, answering 400 to what Discord refuses."""

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        resp = await super()._handle(request)  # records it (aiohttp keeps the body for a second read)
        why = discord_refusal(orjson.loads(await request.read()))
        return web.Response(status=400, text=why) if why else resp


async def test_discord_bodies_stay_within_the_6000_character_embed_total(make_sink: Any) -> None:
    """Each part was cut to its own limit (description 4096, each field 1024, 25 label fields of 256), but
    Discord also caps their sum at 6000 characters: a long screen text with long stream/session names, or a
    digest of many long labels, got HTTP 400 and was dead-lettered (a digest: every alert in it)."""
    srv = await DiscordLike().start()
    try:
        sink = make_sink(url=srv.url(), format="discord", rate_limit="2/s", burst=1, on_limit="digest", **FAST)
        long_one = alert(0, text="t" * 5000)
        long_one["rtstream_name"] = "display:" + "d" * 1500
        long_one["capture_session_id"] = "cap-" + "c" * 1500
        long_one["data"]["matched"] = ["keyword-" + str(i) for i in range(200)]
        digest = [alert(i, label=f"label-{i:02d}-" + "x" * 240) for i in range(1, 31)]
        await run(sink, [long_one, *digest])
    finally:
        await srv.stop()
    assert (sink.delivered, sink.dead_lettered) == (31, 0), dead_letters(sink)
    assert len(srv.requests) == 2


@pytest.mark.parametrize("rate", ["10/0s", "5/0min"])
def test_a_rate_over_zero_seconds_is_a_config_error_not_a_traceback(tmp_path: Path, rate: str) -> None:
    """`rate_limit: 10/0s` passed `pipeline validate`, then `pipeline run` died in the token bucket with
    ZeroDivisionError, a traceback and an unclosed HTTP session."""
    from tests.test_runtime import run_cli

    (tmp_path / "in.jsonl").write_text('{"channel": "alert", "data": {"event_label": "x"}}\n')
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(f"name: rl\nsource: {{type: replay, path: {tmp_path}/in.jsonl}}\n"
                   f"sinks:\n  - type: alert_forwarder\n    url: http://127.0.0.1:9/hook\n    rate_limit: {rate}\n")
    for cmd in ("validate", "run"):
        res = run_cli(cmd, str(cfg), timeout=30)
        assert res.returncode == 2, (cmd, res.stderr)
        assert "Traceback" not in res.stderr and "rate_limit" in res.stderr, res.stderr


@pytest.mark.parametrize("index", ["\u00b2", "9" * 5000])
async def test_a_template_index_that_is_not_a_plain_number_renders_empty(make_sink: Any, index: str) -> None:
    """`{data[matched][²]}` passes the config check (a `[key]` lookup) and `str.isdigit()`, then int() raised
    at every alert, so each one was dead-lettered as "cannot encode the webhook body". Missing keys render
    empty, as the README says."""
    srv = await WebhookServer().start()
    try:
        sink = make_sink(url=srv.url(), format="template", template=f"{{label}}: [{{data[matched][{index}]}}]",
                         **FAST)
        await run(sink, [alert()])
    finally:
        await srv.stop()
    assert (sink.delivered, sink.dead_lettered) == (1, 0), dead_letters(sink)
    assert srv.requests[0].json == {"text": "code-on-screen: []"}


@pytest.mark.parametrize("key", ["timeout", "max_retry_time", "shutdown_timeout"])
def test_a_zero_timeout_is_a_config_error(tmp_path: Path, key: str) -> None:
    """`timeout: 0` was accepted, and aiohttp reads a zero timeout as no timeout at all: a webhook that never
    answers held every concurrency slot for the whole run, the queue filled and ingest stalled behind it.
    `max_retry_time: 0` was read as "never retry" (0 often means "no limit"; no retries is max_attempts: 1), and
    `shutdown_timeout: 0` dead-lettered at exit every alert still queued, one written just before too, without
    a try (and warned "reached with 0 alert(s) still queued" when none was). Each is one config error line."""
    from tests.test_runtime import run_cli

    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"name: t\nsource: {{type: replay, path: {tmp_path}/in.jsonl}}\n"
                   f"sinks:\n  - type: alert_forwarder\n    url: http://127.0.0.1:9/hook\n    {key}: 0\n")
    res = run_cli("validate", str(cfg), timeout=30)
    assert res.returncode == 2 and f"{key} must be more than 0" in res.stderr, res.stderr
    assert "t.yaml:6:5: " in res.stderr and f"sinks[0].{key}" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1



def test_a_digest_max_bytes_below_4kib_is_a_config_error(tmp_path: Path) -> None:
    """A digest bound of a few bytes holds an alert or two: one config error line, not a run of lone alerts."""
    from tests.test_runtime import run_cli

    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"name: t\nsource: {{type: replay, path: {tmp_path}/in.jsonl}}\n"
                   "sinks:\n  - type: alert_forwarder\n    url: http://127.0.0.1:9/hook\n    digest_max_bytes: 1KiB\n")
    res = run_cli("validate", str(cfg), timeout=30)
    assert res.returncode == 2, res.stderr
    assert "t.yaml:6:5: sinks[0].digest_max_bytes: digest_max_bytes must be at least 4KiB (got 1024 bytes" \
        in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

def _crafted_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two different alerts whose fields, joined with the key's separator, read the same."""
    a, b = alert(0), alert(0)
    a["data"].update(source_channel="visual_index", matched=["password"], text="shown\x1eon screen")
    b["data"].update(source_channel="visual_index\x1epassword", matched=["shown"], text="on screen")
    return a, b


async def test_two_different_alerts_never_share_an_idempotency_key(make_sink: Any) -> None:
    """The key hashed the fields joined with \\x1e, a character screen text may hold: an alert crafted to
    join to the same string as a real one (here: source channel, keywords and text shifted across the
    separator) took its key, and the real alert was dropped as a "duplicate" and never sent."""
    from stages.sinks.alert_forwarder.idempotency import alert_key

    a, b = _crafted_pair()
    assert a != b and alert_key(a) != alert_key(b)
    assert alert_key(alert(3)) == alert_key(alert(3))
    srv = await WebhookServer().start()
    try:
        sink = make_sink(url=srv.url(), **FAST)
        await run(sink, [a, b])
    finally:
        await srv.stop()
    assert (sink.delivered, sink.duplicates) == (2, 0)


def test_plain_alerts_keep_their_idempotency_keys() -> None:
    """Receivers dedupe across runs and versions: an alert without separator characters keeps the key it had."""
    import hashlib

    from stages.sinks.alert_forwarder.idempotency import alert_key

    ev = alert(5)
    raw = "\x1e".join(["code-on-screen", "rts-3", str(1710000017340), "visual_index", "code",
                       "User is editing Python code #5"])
    assert alert_key(ev) == hashlib.sha256(raw.encode()).hexdigest()[:32]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed_and_the_signed_body_goes_nowhere_else(make_sink: Any,
                                                                                  status: int) -> None:
    """Guard (README: redirects are never followed): the signed body must not reach the redirect target."""
    other = await WebhookServer().start()
    srv = await WebhookServer().start()
    try:
        srv.script = [(status, {"Location": other.url("/stolen")})]
        sink = make_sink(url=srv.url(), secret="whsec-redirect-test", **FAST)
        await run(sink, [alert()])
    finally:
        await srv.stop()
        await other.stop()
    assert other.requests == [] and len(srv.requests) == 1
    (record,) = dead_letters(sink)
    assert record["status"] == status and "redirect not followed" in record["reason"]


async def test_a_response_whose_headers_never_end_times_out_and_is_retried(make_sink: Any) -> None:
    """Guard: a slow-loris answer (status line, then headers that never end) is bounded by `timeout`."""
    partial = b"HTTP/1.1 200 OK\r\nX-Slow: 1"
    async with RawServer([(partial, "hang"), (partial, "hang")]) as srv:
        sink = make_sink(url=srv.url(), timeout="0.3s", **FAST)
        await run(sink, [alert()])
        assert srv.requests == 3
    assert (sink.delivered, sink.dead_lettered) == (1, 0)
