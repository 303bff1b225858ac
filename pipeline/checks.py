"""`pipeline validate --check`: try every external connection a config names, changing nothing.

VideoDB: the API key and collection (one read-only `get_collection` call). Kafka:
each cluster's metadata. Webhooks and WebSocket URLs: a TCP (and TLS) handshake,
no request is sent. One line per check; the exit code is 1 when any fails.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline import secrets
from pipeline.config import PipelineConfig, placeholders_in
from pipeline.kafka import bootstrap_list

TIMEOUT = 10.0
Check = tuple[str, Callable[[], Awaitable[str]]]


async def _videodb(settings: Any) -> str:
    from pipeline.videodb_sdk import call, connect

    conn = connect(settings, "videodb")
    coll = await call("videodb", f"get_collection({settings.collection_id!r})", conn.get_collection,
                      settings.collection_id, api_key=settings.api_key)
    return f"key accepted, collection {getattr(coll, 'id', settings.collection_id)!r} readable"


async def _kafka(servers: list[str]) -> str:
    from aiokafka.client import AIOKafkaClient

    from pipeline.kafka import quiet_aiokafka

    quiet_aiokafka()
    client = AIOKafkaClient(bootstrap_servers=servers, request_timeout_ms=int(TIMEOUT * 1000))
    from aiokafka.errors import KafkaError

    from pipeline.kafka import describe

    try:
        await client.bootstrap()
        md = await client.fetch_all_metadata()
        return f"{len(md.brokers())} broker(s), {len(md.topics())} topic(s)"
    except KafkaError as exc:
        raise RuntimeError(f"cannot read cluster metadata: {describe(exc)}") from None
    finally:
        await client.close()


async def _handshake(url: str, ca_file: str | None = None) -> str:
    parts = urlsplit(url)
    tls = parts.scheme in ("https", "wss")
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    ctx = None
    if tls:
        ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()) if ca_file else None)
    _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if tls else None)
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
    return "TLS handshake ok" if tls else "TCP connect ok"


class Skipped(Exception):
    """A check that cannot be made: a value it needs is an `--offline` placeholder."""


def _skip(names: list[str]) -> Callable[[], Awaitable[str]]:
    async def fn() -> str:
        raise Skipped(f"{', '.join(names)} not set (an --offline placeholder): export it to check this")
    return fn


def checks(cfg: PipelineConfig, placeholders: list[str] | None = None) -> list[Check]:
    """Every external connection of the enabled stages, each once (skipped when it needs a placeholder)."""
    from pipeline.videodb_sdk import VideoDBSettings

    out: list[Check] = []
    seen: set[str] = set()

    def add(label: str, fn: Callable[[], Awaitable[str]], *needs: Any) -> None:
        if label not in seen:
            seen.add(label)
            text = " ".join(str(v) for v in needs if v is not None)
            missing = placeholders_in(text, placeholders or ())
            out.append((label, _skip(missing) if missing else fn))

    settings = cfg.settings()
    stages = [cfg.source, *([cfg.controller] if cfg.controller else []), *cfg.stages, *cfg.sinks]
    for spec in stages:
        o = spec.options
        if spec.type_name in ("videodb", "capture_session"):
            if cfg.videodb.emulator is not None:
                add("videodb: local emulator", _const("started in-process at run time, nothing to check"))
                continue
            vs = VideoDBSettings.resolve(settings, api_key=getattr(o, "api_key", None),
                                         base_url=getattr(o, "base_url", None),
                                         collection_id=getattr(o, "collection_id", None))
            add(f"videodb {vs.base_url or 'https://api.videodb.io'} collection {vs.collection_id!r}",
                partial(_videodb, vs), vs.api_key, vs.base_url, vs.collection_id)
        servers = getattr(o, "bootstrap_servers", None)
        if servers:
            lst = bootstrap_list(servers)
            add(f"kafka {','.join(lst)}", partial(_kafka, lst), *lst)
        for url in [getattr(o, "url", None), *(getattr(o, "urls", None) or [])]:
            if isinstance(url, str) and ("://" in url or "${" in url):
                kind = "websocket" if spec.kind == "source" else "webhook"
                add(f"{kind} {secrets.mask_url(url)}", partial(_handshake, url, getattr(o, "ca_file", None)), url)
    if cfg.runtime.engine == "faust":
        lst = bootstrap_list(cfg.runtime.broker.removeprefix("kafka://"))
        add(f"kafka (runtime.broker) {','.join(lst)}", partial(_kafka, lst), *lst)
    return out


def _const(text: str) -> Callable[[], Awaitable[str]]:
    async def fn() -> str:
        return text
    return fn


async def _run_all(items: list[Check]) -> list[tuple[str, bool | None, str]]:
    async def one(label: str, fn: Callable[[], Awaitable[str]]) -> tuple[str, bool | None, str]:
        try:
            return label, True, await asyncio.wait_for(fn(), TIMEOUT)
        except Skipped as exc:
            return label, None, str(exc)
        except TimeoutError:
            return label, False, f"no answer within {TIMEOUT:g}s"
        except Exception as exc:
            text = str(exc) or type(exc).__name__
            return label, False, secrets.mask(text.removeprefix("videodb: ").replace("\n", " "))

    return list(await asyncio.gather(*(one(label, fn) for label, fn in items)))


def run_checks(cfg: PipelineConfig, placeholders: list[str] | None = None) -> int:
    """Print one line per check; 0 when none fails (skipped ones say so), 1 otherwise."""
    items = checks(cfg, placeholders)
    if not items:
        print("check: this config makes no external connections")
        return 0
    results = asyncio.run(_run_all(items))
    for label, ok, detail in results:
        print(f"check {'skip' if ok is None else 'ok  ' if ok else 'FAIL'} {label}: {detail}")
    return 1 if any(ok is False for _, ok, _ in results) else 0
