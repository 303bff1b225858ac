"""Hostile configs and texts: catastrophic regexes, YAML bombs, templates an event can steer, odd case folds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from pipeline.api import Context
from stages.processors.rules import Rules, RulesOptions
from stages.sinks.alert_forwarder import AlertForwarder, AlertForwarderOptions
from stages.sinks.alert_forwarder.idempotency import alert_key
from tests.webhook_server import WebhookServer

ROOT = Path(__file__).resolve().parents[2]
MakeCtx = Callable[..., Context]


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def vis(text: str, start: int = 1000, channel: str = "visual_index") -> dict[str, Any]:
    return {"channel": channel, "rtstream_id": "rts-3", "data": {"text": text, "start": start}}


# -- 5. catastrophic regex ---------------------------------------------------------------------------

def test_catastrophic_regex_runs_in_linear_time(tmp_path: Path) -> None:
    """Before: `(a+)+$` on 30 a's and a `!` froze the pipeline (signals included) for ~40 s per event."""
    events = [vis("a" * 40 + "!", start=i) for i in range(20)] + [vis("aaa", start=99)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    (tmp_path / "p.yaml").write_text(f"""
name: redos
source: {{type: replay, path: {tmp_path}/in.jsonl}}
stages:
  - type: rules
    rules: [{{name: r, keywords: ["(a+)+$"], match: regex}}]
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
""")
    started = time.monotonic()
    res = cli("run", str(tmp_path / "p.yaml"), cwd=tmp_path, timeout=30)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 15
    alerts = [e for e in map(orjson.loads, (tmp_path / "out.jsonl").read_bytes().splitlines())
              if e.get("channel") == "alert"]
    assert [a["data"]["matched"] for a in alerts] == [["aaa"]]


@pytest.mark.parametrize(("pattern", "why"), [(r"(a)\1", "invalid escape sequence"),
                                             (r"pass(?=word)", "invalid perl operator"),
                                             ("(x{1000}){1000}", "invalid repetition size")])
def test_regex_re2_cannot_run_is_rejected_at_load(tmp_path: Path, pattern: str, why: str) -> None:
    (tmp_path / "p.yaml").write_text(f"""
name: bad
source: {{type: replay, path: in.jsonl}}
stages:
  - type: rules
    rules: [{{name: r, keywords: ['{pattern}'], match: regex}}]
sinks: [{{type: jsonl, path: out.jsonl}}]
""")
    res = cli("validate", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "RE2" in err[0] and "p.yaml:6" in err[0], res.stderr


def test_re2_only_syntax_is_accepted(make_context: MakeCtx) -> None:
    r = Rules(RulesOptions.model_validate({"rules": [{"name": "x", "keywords": [r"\pL+-\d+"], "match": "regex"}]}),
              make_context())
    out = r.process([vis("ticket ABC-12")])
    assert out[-1]["data"]["matched"] == ["ABC-12"]
    with pytest.raises(ValidationError, match="invalid regex"):
        RulesOptions.model_validate({"rules": [{"name": "x", "keywords": ["("], "match": "regex"}]})


# -- 14. case folding that adds characters ------------------------------------------------------------

def test_dotted_capital_i_does_not_make_a_word_boundary(make_context: MakeCtx) -> None:
    """`"İ".lower()` is two characters (i + U+0307): before, "İpassword" held the whole word "password"."""
    r = Rules(RulesOptions.model_validate({"rules": [
        {"name": "w", "keywords": ["password", "pass word"]},
        {"name": "s", "keywords": ["İstanbul"], "match": "substring"}]}), make_context())

    def fired(text: str) -> list[list[str]]:
        return [a["data"]["matched"] for a in r.process([vis(text, start=len(text))]) if a["channel"] == "alert"]

    assert fired("İpassword leaked") == []
    assert fired("İİ password leaked") == [["password"]]
    assert fired("İİİ pass  word") == [["pass word"]]
    assert fired("İPASS WORD") == []
    assert fired("from istanbul") == [["İstanbul"]]


# -- 9. idempotency keys ------------------------------------------------------------------------------

def alert(label: str, text: str, source: str, matched: list[str]) -> dict[str, Any]:
    return {"channel": "alert", "origin": "rules", "rtstream_id": "rts-3",
            "data": {"event_label": label, "timestamp": 1710000012340, "text": text, "matched": matched,
                     "source_channel": source}}


def test_distinct_alerts_at_the_same_instant_get_distinct_keys() -> None:
    """Before: the key was (label, rtstream, time): any two alerts of one rule at one instant collided."""
    a = alert("code", "editing python", "visual_index", ["python"])
    keys = {alert_key(a), alert_key(alert("code", "editing python", "transcript", ["python"])),
            alert_key(alert("code", "editing rust", "visual_index", ["python"])),
            alert_key(alert("code", "editing python", "visual_index", ["editing"]))}
    assert len(keys) == 4
    assert alert_key(dict(a)) == alert_key(a)  # the same alert replayed: the same key


async def test_forwarder_delivers_distinct_alerts_and_reports_real_duplicates(make_context: MakeCtx,
                                                                               caplog: Any) -> None:
    server = await WebhookServer().start()
    try:
        ctx = make_context("alerts")
        sink = AlertForwarder(AlertForwarderOptions(url=server.url(), shutdown_timeout="10s"), ctx)
        await sink.start()
        a, b = alert("code", "one", "visual_index", ["x"]), alert("code", "two", "transcript", ["x"])
        await sink.write([a, b, dict(a)])
        await sink.close()
    finally:
        await server.stop()
    assert sorted(r.json["alert"]["data"]["text"] for r in server.requests) == ["one", "two"]
    assert sink.report()["duplicates"] == 1
    assert "1 alert(s) not sent again" in caplog.text
