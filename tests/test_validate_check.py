"""`pipeline validate --check`: every external connection tried, nothing changed, one line per check."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

from pipeline.emulator import Emulator
from tests.broker import Broker, free_port, kafka_broker  # noqa: F401
from tests.webhook_server import WebhookServer, self_signed

ROOT = Path(__file__).resolve().parents[1]


def config(emu: str, key: str, kafka: str, hook: str, cert: Path, plain: str) -> str:
    return f"""name: chk
videodb: {{api_key: "{key}", base_url: "{emu}", collection_id: default}}
source: {{type: videodb}}
controller: {{type: capture_session, end_user_id: u}}
sinks:
  - {{type: kafka, bootstrap_servers: "{kafka}", topic: "t.{{channel}}"}}
  - {{type: alert_forwarder, url: "{hook}", ca_file: "{cert}"}}
  - {{type: alert_forwarder, url: "{plain}"}}
"""


async def check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pipeline.cli", "validate", "--check", str(cfg)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_check_tries_every_connection_and_changes_nothing(
        tmp_path: Path, kafka_broker: Broker) -> None:  # noqa: F811
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    emu = Emulator(api_key="good-key", speed=0)
    await emu.start()
    hook = await WebhookServer(ssl_context=tls).start()
    plain = await WebhookServer().start()
    try:
        p = tmp_path / "p.yaml"
        p.write_text(config(emu.base_url, "good-key", kafka_broker.bootstrap, hook.url(), cert, plain.url()))
        res = await check(p)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("check ")]
        assert res.returncode == 0, res.stdout + res.stderr
        assert len(lines) == 4, lines
        assert any(f"ok   videodb {emu.base_url} collection 'default': key accepted" in ln for ln in lines)
        assert any(f"ok   kafka {kafka_broker.bootstrap}: 1 broker(s)" in ln for ln in lines)
        assert any("ok   webhook https://127.0.0.1:" in ln and "TLS handshake ok" in ln for ln in lines)
        assert any("ok   webhook http://127.0.0.1:" in ln and "TCP connect ok" in ln for ln in lines)
        assert "T0KEN-s3cr3t-path" not in res.stdout
        assert hook.requests == [] and plain.requests == []  # no alert was sent
        assert [(c["method"], c["path"]) for c in emu.calls] == [("GET", "/collection/default")]

        closed = f"http://127.0.0.1:{free_port()}/hook"
        p.write_text(config(emu.base_url, "wrong-key", "127.0.0.1:1", hook.url(), cert, closed))
        res = await check(p)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("check ")]
        assert res.returncode == 1, res.stdout + res.stderr
        assert any("FAIL videodb" in ln and "authentication failed" in ln for ln in lines), lines
        assert any("FAIL kafka 127.0.0.1:1" in ln for ln in lines), lines
        assert any("FAIL webhook http://127.0.0.1:" in ln for ln in lines), lines
        assert any("ok   webhook https://" in ln for ln in lines), lines
        assert "wrong-key" not in res.stdout + res.stderr
    finally:
        await hook.stop()
        await plain.stop()
        await emu.stop()


async def test_offline_check_skips_what_needs_a_placeholder(tmp_path: Path) -> None:
    """`validate --offline --check` used to send the literal `${VIDEO_DB_API_KEY}` to VideoDB as the key."""
    emu = Emulator(api_key="good-key", speed=0)
    await emu.start()
    try:
        p = tmp_path / "p.yaml"
        p.write_text(f"""name: offline
videodb: {{api_key: "${{VIDEO_DB_API_KEY}}", base_url: "{emu.base_url}"}}
source: {{type: videodb}}
sinks:
  - {{type: kafka, bootstrap_servers: "${{KAFKA_SERVERS}}"}}
  - {{type: alert_forwarder, url: "http://127.0.0.1:{free_port()}/closed"}}
""")
        env = {k: v for k, v in os.environ.items() if k not in ("VIDEO_DB_API_KEY", "KAFKA_SERVERS")}
        res = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pipeline.cli", "validate", "--offline", "--check", str(p)],
            capture_output=True, text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT)})
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("check ")]
        assert res.returncode == 1, res.stdout + res.stderr  # the closed webhook port fails
        assert f"check skip videodb {emu.base_url} collection 'default': VIDEO_DB_API_KEY not set" in res.stdout
        assert any(ln.startswith("check skip kafka ") and "KAFKA_SERVERS not set" in ln for ln in lines), lines
        assert any(ln.startswith("check FAIL webhook http://127.0.0.1:") for ln in lines), lines
        assert len(lines) == 3 and res.stderr == "", res.stderr
        assert not emu.calls  # nothing was sent with a placeholder for a key
        # an unreachable VideoDB is one FAIL line: no urllib3 warning per retry of the SDK's request
        p.write_text(f"name: closed\nvideodb: {{api_key: k, base_url: 'http://127.0.0.1:{free_port()}'}}\n"
                     "source: {type: videodb}\nsinks: [{type: console}]\n")
        res = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pipeline.cli", "validate", "--check", str(p)],
            capture_output=True, text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 1 and "check FAIL videodb http://127.0.0.1:" in res.stdout, res.stdout
        assert res.stderr == "", res.stderr
    finally:
        await emu.stop()
