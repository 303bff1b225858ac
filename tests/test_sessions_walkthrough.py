"""The README's backend walkthrough, step by step: `pipeline emulate --manual`, `pipeline run
config/sessions.yaml` (the shipped file), the curl calls as HTTP requests, `pipeline report`, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.procs import stop_process

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = Path(sys.executable).parent / "pipeline"
TOKEN = "walkthrough-token-0123456789"
KEY = "dev-key-0123456789"


def request(method: str, url: str, body: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# What the walkthrough tells the reader to type (the test fails if the README changes without it).
README_STEPS = [
    "export SESSION_API_TOKEN=walkthrough-token-0123456789 EMULATOR_URL=http://127.0.0.1:8800",
    "pipeline emulate --manual --port 8800 --api-key dev-key-0123456789",
    "VIDEO_DB_API_KEY=dev-key-0123456789 VIDEO_DB_BASE_URL=$EMULATOR_URL pipeline run config/sessions.yaml",
    "curl -s -X POST http://127.0.0.1:8700/v1/sessions \\\n"
    "  -H \"Authorization: Bearer $SESSION_API_TOKEN\" -H 'Idempotency-Key: record-42-001' \\\n"
    "  -d '{\"end_user_id\": \"user-42\", \"metadata\": {\"plan\": \"pro\"}}'",
    "curl -X POST $EMULATOR_URL/_emulator/sessions/cap-a7a279e8ea2c/start",
    "curl -s http://127.0.0.1:8700/v1/sessions/cap-a7a279e8ea2c -H \"Authorization: Bearer $SESSION_API_TOKEN\"",
    "curl -s -X POST http://127.0.0.1:8700/v1/sessions/cap-a7a279e8ea2c/stop -H \"Authorization: Bearer "
    "$SESSION_API_TOKEN\"",
    "pipeline report out/sessions",
]


def test_readme_backend_walkthrough(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert [step for step in README_STEPS if step not in readme] == []
    # as in the README, except: free ports instead of 8800/8700 (tests run side by side), emulator at 10x
    env = {**os.environ, "SESSION_API_TOKEN": TOKEN, "SESSION_API_LISTEN": "127.0.0.1:0"}
    emu_out = (tmp_path / "emulator.out").open("w")
    emu = subprocess.Popen([str(PIPELINE), "emulate", "--manual", "--speed", "10", "--api-key", KEY], cwd=ROOT,
                           stdout=emu_out, stderr=subprocess.STDOUT, env=env)
    run_err = tmp_path / "run.err"
    run = None
    try:
        emulator_url = wait_for(lambda: re.findall(r"EMULATOR_URL=(\S+)", (tmp_path / "emulator.out").read_text()),
                                "the emulator's URL")[0]
        run = subprocess.Popen([str(PIPELINE), "run", str(ROOT / "config" / "sessions.yaml")], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=run_err.open("w"),
                               env={**env, "VIDEO_DB_API_KEY": KEY, "VIDEO_DB_BASE_URL": emulator_url})
        api = wait_for(lambda: re.findall(r"session API on (http://\S+)/v1/sessions", run_err.read_text()),
                       "the session API")[0]

        # the backend, when user 42 clicks "record"
        status, made = request("POST", f"{api}/v1/sessions", {"end_user_id": "user-42", "metadata": {"plan": "pro"}},
                               {"Idempotency-Key": "record-42-001"})
        assert status == 201, made
        sid = made["session_id"]
        assert made["client_token"].startswith("ct-") and made["expires_at"] and made["status"] == "created"
        # the desktop client starts capturing (the emulator's hook plays that part)
        req = urllib.request.Request(f"{emulator_url}/_emulator/sessions/{sid}/start", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        out = tmp_path / "out" / "sessions" / "by-session" / f"{sid}.jsonl"

        def transcripts() -> list[dict[str, Any]]:
            lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
            return [e for e in lines if e.get("channel") == "transcript"]

        wait_for(transcripts, "transcripts in the session's own file")
        status, one = request("GET", f"{api}/v1/sessions/{sid}")
        assert status == 200 and one["status"] == "active" and one["events"]["transcript"] > 0, one
        assert {r["name"] for r in one["rtstreams"]} == {"mic:default", "system_audio:default", "display:1"}
        assert one["events"]["capture_session"] == 3 and one["last_event_at"].endswith("Z")

        status, stopped = request("POST", f"{api}/v1/sessions/{sid}/stop")
        assert status == 202 and stopped["stop_requested"] is True
        done = wait_for(lambda: (s := request("GET", f"{api}/v1/sessions/{sid}")[1])["status"] == "exported" and s,
                        "the session to be exported")
        assert done["player_url"].startswith("https://")
        assert run.poll() is None  # the pipeline runs on for other sessions

        rep = subprocess.run([str(PIPELINE), "report", "out/sessions"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        assert rep.returncode == 0 and rep.stdout.strip() == f"out/sessions/report-{sid}.html", rep.stderr

        run.send_signal(signal.SIGINT)  # Ctrl-C in terminal 2
        assert run.wait(30) == 0, run_err.read_text()
        assert "Traceback" not in run_err.read_text()
    finally:
        for p in (run, emu):
            if p is not None:
                stop_process(p, signal.SIGINT, 10)
        emu_out.close()
