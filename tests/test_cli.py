"""The small CLI commands: stages, schema, validate, and the instant start they promise."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _help(*args: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([*args, "--help"])
    return buf.getvalue()


def test_every_subcommand_s_help_lists_the_log_options() -> None:
    """`pipeline emulate`, `tap`, `top` and `report` took --log-level/--log-format (the top-level parser reads
    them before or after any subcommand) but their --help did not list them: now every subcommand's does."""
    commands = re.findall(r"(?m)^    (\w+)\s{2,}", _help())
    assert {"run", "listen", "emulate", "tap", "top", "report", "worker"} <= set(commands), commands
    for name in commands:
        text = _help(name)
        assert "--log-level {debug,info,warning,error}" in text and "--log-format {text,json}" in text, name


def test_the_readme_cli_table_matches_every_help() -> None:
    """Every subcommand `pipeline --help` lists has a row in the README's CLI table, and the options of its
    `--help` and of its row are the same (`emulate`'s are in the emulator's own table)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## CLI"):readme.index("\nGlobal:", readme.index("## CLI"))]
    rows = {m[1]: m[2] for m in re.finditer(r"(?m)^\| `pipeline (\w+)([^`]*)` \|", table)}
    assert sorted(rows) == sorted(re.findall(r"(?m)^    (\w+)\s{2,}", _help()))
    option = re.compile(r"(?<![\w-])(--[a-z][\w-]*|-[a-z])\b")
    emulator = readme[readme.index("## Local VideoDB emulator"):readme.index("What it does:")]
    common = {"-h", "--help", "--log-level", "--log-format"}
    for name, row in rows.items():
        text = _help(name)
        helped = {o for o in option.findall(text.partition("options:")[2]) if o not in common}
        documented = set(option.findall(emulator if name == "emulate" else row))
        long_short = {m[2]: m[1] for m in re.finditer(r"(-[a-z])(?: [A-Z_]+)?, (--[\w-]+)", text)}  # -q, --quiet: one
        assert {long_short.get(o, o) for o in helped} <= documented, (name, helped - documented)
        assert {o for o in documented if o not in text}.issubset(common), name
