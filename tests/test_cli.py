"""The small CLI commands: stages, schema, validate, and the instant start they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_stages_lists_every_builtin(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["stages", "-v"]) == 0
    out = capsys.readouterr().out
    for kind, name in [("source", "replay"), ("source", "websocket"), ("source", "videodb"), ("source", "kafka"),
                       ("processor", "filter"), ("processor", "enrich"), ("processor", "rules"),
                       ("sink", "jsonl"), ("sink", "console"), ("sink", "kafka"), ("sink", "alert_forwarder"),
                       ("controller", "capture_session"), ("processor", "shout")]:
        assert any(line.split()[:2] == [kind, name] for line in out.splitlines()), (kind, name)
    assert "flush_interval" in out and "default 1.0" in out


def test_schema_covers_stage_options(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    sinks = schema["properties"]["sinks"]["items"]["oneOf"]
    jsonl = next(s for s in sinks if s["properties"]["type"] == {"const": "jsonl"})
    assert {"path", "channels", "flush_interval"} <= set(jsonl["properties"]) and "path" in jsonl["required"]
    assert schema["additionalProperties"] is False


def test_stages_lists_every_value_an_option_takes(capsys) -> None:  # type: ignore[no-untyped-def]
    """`idempotence: bool | "auto"` was listed as "one of: auto", hiding the `true` the README documents."""
    assert main(["stages", "-v"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("idempotence "))
    assert "one of: true, false, auto;" in line, line


def test_shipped_configs_validate() -> None:
    for cfg in sorted(c for c in (ROOT / "config").glob("*.yaml") if not c.name.endswith(".test.yaml")):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "VIDEO_DB_API_KEY": "k", "PYTHONPATH": str(ROOT),
                                  "SESSION_API_TOKEN": "t" * 16})
        assert res.returncode == 0, (cfg, res.stderr)


def test_cli_imports_nothing_heavy() -> None:
    code = ("import sys, pipeline.cli, pipeline.config, pipeline.registry; "
            "print(sorted(m for m in ('faust', 'aiokafka', 'videodb', 'aiohttp') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_log_options_after_schema_and_test() -> None:
    """--log-level/--log-format after the subcommand are accepted by every subcommand, schema and test too."""
    for args in (["schema", "--log-level", "warning"], ["test", "config/", "--log-format", "json"]):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and "unrecognized arguments" not in res.stderr, (args, res.stderr)
