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


# -- 6. YAML that expands or nests without bound; tags on collections ---------------------------------

LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
MERGES = "m0: &m0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8, k8: 9}\n" + "".join(
    f"m{i + 1}: &m{i + 1} {{<<: [" + ",".join([f"*m{i}"] * 9) + f"], z{i}: 1}}\n" for i in range(9))
DEEP_BLOCK = "x:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(1, 900)) + " " * 1800 + "v: 1\n"  # < 1 MiB


@pytest.mark.parametrize(("body", "expected"), [
    (LAUGHS, ":6:4: more than 100000 values once aliases and merge keys are expanded (an alias bomb?)"),
    (MERGES, ":5:14: more than 100000 values once aliases and merge keys are expanded (an alias bomb?)"),
    ("x: &r [*r]\n", ":1:4: an alias refers to a value that contains it"),
    ("x: &r {y: *r}\n", ":1:4: an alias refers to a value that contains it"),
    ("x: " + "[" * 20000 + "]" * 20000 + "\n", ":1: invalid YAML: nested too deeply (at most 64 levels)"),
    ("x: " + "[" * 100 + "]" * 100 + "\n", ":1:67: nested more than 64 levels deep"),
    (DEEP_BLOCK, ":65:129: nested more than 64 levels deep"),
    (DEEP_BLOCK + "#" * (1 << 20), ": larger than 1 MiB: not a config file (a config is a few KB)"),
    ("name: !!python/object:os.system {x: 1}\n", ":1:7: name: tag 'tag:yaml.org,2002:python/object:os.system' "
                                                 "is not allowed (plain YAML only)"),
], ids=["laughs", "merge-bomb", "recursive-list", "recursive-map", "deep-flow", "deep-100", "deep-block",
        "over-1-mib", "python-object-mapping"])
def test_hostile_yaml_is_one_line_exit_2(tmp_path: Path, body: str, expected: str) -> None:
    """Before: 48 s and 3.9 GB then a MemoryError traceback; RecursionError tracebacks; a tag silently ignored."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    started = time.monotonic()
    res = cli("validate", str(cfg), cwd=tmp_path, timeout=60)
    assert time.monotonic() - started < 20
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr == f"pipeline: {cfg}{expected}\n"


# -- 13. a template whose width an event chooses ------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ("{text:>{data[w]}}", "a format spec cannot contain fields"),
    ("{text:>400000000}", "widths and precisions are at most 1000"),
])
def test_template_format_spec_is_fixed_and_bounded(tmp_path: Path, template: str, expected: str) -> None:
    """Before: `{text:>{data[w]}}` was accepted and a 120-byte event with w=400000000 made a 400 MB POST."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: t
source: {{type: replay, path: in.jsonl}}
sinks:
  - {{type: alert_forwarder, url: "http://127.0.0.1:9/hook", format: template, template: "{template}"}}
""")
    res = cli("validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert expected in res.stderr and f"{cfg}:5:" in res.stderr
    assert AlertForwarderOptions(url="http://127.0.0.1:9/h", format="template", template="{text:>20.5}")


def test_validate_hides_the_user_part_of_urls(tmp_path: Path) -> None:
    """Before: `http://alice:***@host`: the user name was printed."""
    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
name: t
source: {type: replay, path: in.jsonl}
sinks: [{type: alert_forwarder, url: "http://alice:hunter22@127.0.0.1:9/hook"}]
""")
    res = cli("validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "alice" not in res.stdout and "hunter22" not in res.stdout
    assert '"http://***@127.0.0.1:9' in res.stdout


async def test_rules_alerts_at_one_instant_all_reach_the_webhook_and_duplicates_are_in_the_summary(
        tmp_path: Path) -> None:
    """Before: the second channel's alert at the same instant had the first one's key and was dropped."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    events = [vis("password on screen", start=5000), vis("password said aloud", start=5000, channel="transcript"),
              vis("password on screen", start=5000)]  # the first again: a true duplicate
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    server = await WebhookServer().start()
    try:
        (tmp_path / "p.yaml").write_text(f"""
name: keys
source: {{type: replay, path: {tmp_path}/in.jsonl}}
stages:
  - type: rules
    rules: [{{name: secret, keywords: [password], channels: [visual_index, transcript]}}]
sinks:
  - {{type: alert_forwarder, url: "{server.url()}", channels: [alert], shutdown_timeout: 10s}}
dead_letter: {tmp_path}/dead.jsonl
""")
        rt = LocalRuntime(build(load_config(tmp_path / "p.yaml")), install_signals=False)
        assert await rt.run() == 0, rt.error
    finally:
        await server.stop()
    assert sorted(r.json["alert"]["data"]["text"] for r in server.requests) == [
        "password on screen", "password said aloud"]
    assert "duplicates 1" in rt.summary()
