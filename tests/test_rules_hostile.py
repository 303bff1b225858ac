"""What a rule author can write that must give one clear error line or a working stage, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from stages.processors.rules import Rules, RulesOptions
from tests.test_authoring import cli

HEAD = """name: t
source: {type: replay, path: in.jsonl}
stages:
  - type: rules
    rules:
"""
SINKS = "sinks: [{type: jsonl, path: out.jsonl}]\n"


def _write(tmp_path: Path, rules: str) -> Path:
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript", "rtstream_id": "r", '
                                       '"data": {"text": "code here", "start": 1000}}\n')
    p = tmp_path / "p.yaml"
    p.write_text(HEAD + rules + SINKS)
    return p


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1" + "0" * 400, "1" + "0" * 400 + "s"])
@pytest.mark.parametrize("key", ["cooldown", "window"])
def test_a_duration_no_clock_has_is_one_error_line(tmp_path: Path, key: str, value: str) -> None:
    """`cooldown: .inf` passed validation and the run then died with OverflowError in the rules stage."""
    extra = ", min_count: 2" if key == "window" else ""
    p = _write(tmp_path, f"      - {{name: a, keywords: [code], {key}: {value}{extra}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    [line] = str(info.value).splitlines()
    assert f"stages[0].rules[0].{key}: expected a duration like 30s" in line


def test_a_cooldown_longer_than_the_c_engine_holds_still_runs(tmp_path: Path) -> None:
    """A finite cooldown past 2**63 ms passed validation and the C engine refused it with a traceback."""
    p = _write(tmp_path, "      - {name: a, keywords: [code], cooldown: 99999999999999999999999999d}\n")
    res = cli("run", str(p), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert '"event_label":"a"' in (tmp_path / "out.jsonl").read_text().replace(" ", "")


def test_a_huge_cooldown_is_still_a_cooldown(make_context) -> None:  # type: ignore[no-untyped-def]
    opts = RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"], "cooldown": 1e30}]})
    stage = Rules(opts, make_context())
    events = [{"channel": "transcript", "rtstream_id": "r", "data": {"text": "code", "start": t}}
              for t in (1, 10**15, 10**18)]
    stage.process(events)
    assert stage.fired == 1
