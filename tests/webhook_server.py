"""A real local webhook receiver for alert_forwarder tests: scripted responses, recorded requests."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

HANG = "hang"


@dataclass
class Received:
    """One request as the server saw it."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class WebhookServer:
    """aiohttp.web on 127.0.0.1:0. `script` entries: status, (status, headers, body) or HANG; then 200."""

    script: list[Any] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    ssl_context: Any = None
    delay: float = 0.0  # seconds every response takes (a slow receiver)
    max_body: int = 0  # when set, a longer body gets 413, as nginx's client_max_body_size answers
    port: int = 0
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(time.monotonic(), request.path, dict(request.headers), body))
        if self.max_body and len(body) > self.max_body:
            return web.Response(status=413, text="Request Entity Too Large")
        step = self.script.pop(0) if self.script else 200
        if self.delay:
            await asyncio.sleep(self.delay)
        if step == HANG:
            await asyncio.sleep(3600)
        if isinstance(step, tuple):
            status, headers, text = (*step, "")[:3]
            return web.Response(status=status, headers=headers, text=text)
        return web.Response(status=step, text="ok" if step < 300 else "error")

    async def start(self) -> WebhookServer:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    def url(self, path: str = "/hook/T0KEN-s3cr3t-path") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1 (skips the test when openssl is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
