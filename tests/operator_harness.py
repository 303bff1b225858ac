"""Shared helpers for the operator-endpoint tests: a served in-process pipeline, replay files, scrapes."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.build import build
from pipeline.config import load_config
from pipeline.http.attach import operator_view
from pipeline.runtime.local import LocalRuntime

RULES = """
stages:
  - {type: filter, channels: [transcript, visual_index, alert]}
  - type: rules
    rules:
      - {name: secret, keywords: [password], severity: critical, channels: [visual_index, transcript]}
      - {name: code, keywords: [code], channels: [visual_index], cooldown: 1h}
"""


def replay_file(path: Path, n: int, *, step: float = 0.001, alert_every: int = 50, garbage: int = 0) -> Path:
    """`n` events (every `alert_every`th mentions a password), `garbage` non-JSON lines at the end."""
    t0 = 1_700_000_000.0
    with path.open("wb") as fh:
        for i in range(n):
            text = f"password on screen {i}" if i % alert_every == 0 else f"meeting line {i} with code"
            ch = "visual_index" if i % 2 else "transcript"
            ev = {"channel": ch, "rtstream_id": f"rts-{i % 3}", "rtstream_name": "display:1", "id": i,
                  "unix_ts": t0 + i * step, "data": {"text": text, "start": int((t0 + i * step) * 1000)}}
            fh.write(orjson.dumps(ev) + b"\n")
        for i in range(garbage):
            fh.write(b"not json %d\n" % i)
    return path


def config(tmp_path: Path, events: Path, *, speed: float = 0, extra_runtime: str = "", sinks: str = "",
           stages: str = RULES, name: str = "ops", http: str | None = "127.0.0.1:0",
           status_interval: float = 0) -> Path:
    http_key = f'http: "{http}", ' if http else ""
    body = f"""
name: {name}
source: {{type: replay, path: {events}, speed: {speed}, batch_size: 64}}
{stages}
sinks:
  - {{type: jsonl, path: {tmp_path}/out.jsonl}}
  - {{type: jsonl, path: {tmp_path}/alerts.jsonl, channels: [alert]}}
{sinks}
runtime: {{{http_key}status_interval: {status_interval} {extra_runtime}}}
dead_letter: {tmp_path}/dead.jsonl
"""
    p = tmp_path / "p.yaml"
    p.write_text(body)
    return p


@contextlib.asynccontextmanager
async def served(path: Path) -> AsyncIterator[tuple[LocalRuntime, str]]:
    """A built runtime with its operator endpoint up (not yet running); yields (runtime, base URL)."""
    rt = LocalRuntime(build(load_config(path)), install_signals=False)
    async with operator_view(rt, rt.b):
        yield rt, rt.http_server.url


async def scrape(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics parsed by prometheus_client: sample name -> {sorted labels (without pipeline): value}."""
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pipeline"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


async def get_json(base: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + path, **kw) as r:
        return r.status, await r.json()


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a plain GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
