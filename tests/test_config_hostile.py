"""Option values at the edges: every one is a config line with its key path, never a crash at run time."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_a_whole_number_past_int64_is_a_config_error_not_a_crash_at_run_time(tmp_path: Path) -> None:
    """`batch_size: 99999999999999999999999` validated, and `pipeline run` then failed in the replay source
    (`ValueError: Stop argument for islice() must be ... <= sys.maxsize`) before reading anything."""
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nsource: {type: replay, path: in.jsonl, batch_size: 99999999999999999999999}\n"
                 "stages: [{type: filter, min_text_length: short}]\nsinks: [{type: console}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert str(info.value).splitlines() == [  # every error at once, each with its key path
        f"{p}:2:40: source.batch_size: whole number out of range (at most 9,223,372,036,854,775,807): "
        "no option counts that far",
        f"{p}:3:25: stages[0].min_text_length: expected an integer, got 'short'"]


def test_an_unquoted_variable_inside_a_flow_mapping_gets_a_hint(tmp_path: Path) -> None:
    """`{type: replay, speed: ${SPEED:-0}}` is not YAML (`{` opens a mapping); the error only said
    "did not find expected ',' or '}'", pointing into the variable, with nothing about quoting it."""
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nsource: {type: replay, path: in.jsonl, speed: ${SPEED:-0}}\nsinks: [{type: console}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert str(info.value).startswith(f"{p}:2:")
    assert str(info.value).endswith('(inside [...] or {...} quote a variable: "${SPEED:-0}")')
