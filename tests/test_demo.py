"""`config/demo.yaml`, the full offline loop: emulator + real SDK + controller + stages + sinks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_demo_runs_the_full_loop_offline(tmp_path: Path) -> None:
    res = run(["run", str(ROOT / "config/demo.yaml")], tmp_path, {"DEMO_SPEED": "0"})
    assert res.returncode == 0, res.stderr
    assert "ended: capture session exported" in res.stderr
    events = [orjson.loads(x) for x in (tmp_path / "out/demo/events.jsonl").read_bytes().splitlines()]
    statuses = [e["status"] for e in events if "event" in e]
    assert statuses == ["created", "starting", "active", "stopping", "stopped", "exported"]
    channels = {e.get("channel") for e in events}
    assert {"transcript", "visual_index", "audio_index", "alert"} <= channels
    assert all(e.get("capture_session_id") for e in events)
    assert all("ts" in e and "unix_ts" in e for e in events)
    alerts = [orjson.loads(x) for x in (tmp_path / "out/demo/alerts.jsonl").read_bytes().splitlines()]
    labels = {a["data"]["event_label"] for a in alerts}
    assert {"code_on_screen", "password_prompt"} <= labels  # VideoDB's own alerts, created by the controller
    assert {"code-on-screen", "secret-exposed"} <= labels  # the rules stage's
    assert "[ALERT critical secret-exposed" in res.stdout
    state = orjson.loads((tmp_path / "out/demo/capture_session.json").read_bytes())
    assert state["session_id"].startswith("cap-")
    assert oct((tmp_path / "out/demo/capture_session.json").stat().st_mode & 0o777) == "0o600"


def test_no_secret_in_any_output(tmp_path: Path) -> None:
    """API key, webhook URL token, signing secret and client token never appear in output or logs."""
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=500)  # forces retries and dead-lettering: error paths log too

    async def main() -> subprocess.CompletedProcess[str]:
        app = web.Application()
        app.router.add_post("/hooks/{token}", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        cfg = (ROOT / "config/demo.yaml").read_text().replace(
            "  collection_id: default\n", "  collection_id: default\n  api_key: ${SECRET_KEY}\n")
        cfg += f"""  - type: alert_forwarder
    url: "http://127.0.0.1:{port}/hooks/${{HOOK_TOKEN}}"
    secret: "${{SIGN_SECRET}}"
    max_attempts: 2
    backoff_initial: 10ms
"""
        (tmp_path / "p.yaml").write_text(cfg)
        env = {"DEMO_SPEED": "0", "SECRET_KEY": "sk-live-abcdef123456", "HOOK_TOKEN": "T0KEN-xyz-987",
               "SIGN_SECRET": "whsec-s3cr3t-value"}
        try:
            res = await asyncio.to_thread(run, ["--log-level", "debug", "run", str(tmp_path / "p.yaml")],
                                          tmp_path, env)
            res2 = await asyncio.to_thread(run, ["validate", str(tmp_path / "p.yaml")], tmp_path, env)
        finally:
            await runner.cleanup()
        res.stdout += res2.stdout + res2.stderr
        return res

    res = asyncio.run(main())
    assert res.returncode == 0, res.stderr
    assert got, "the webhook was called"
    token = orjson.loads((tmp_path / "out/demo/capture_session.json").read_bytes())["client_token"]
    output = res.stdout + res.stderr
    output += "".join(p.read_text() for p in (tmp_path / "out").rglob("*.jsonl"))
    for secret in ("sk-live-abcdef123456", "T0KEN-xyz-987", "whsec-s3cr3t-value", token):
        assert secret not in output, secret
    assert "dead-lettered" in res.stderr
