"""Every pipeline config fragment README.md shows (```yaml blocks of stages, sinks, the controller, runtime),
completed into a whole file, validates as written, and against `pipeline schema` (an editor's check): a reader
copies them."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.cli import _all_stage_classes
from pipeline.config import load_config
from pipeline.schema import json_schema

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = [(README[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```yaml\n(.*?)```", README, re.S)]
#: not pipeline configs: a rule test file, an emulator scenario, the plugin example (its stage is not installed)
OTHER = ("# config/meeting.test.yaml", "name: my-meeting", "  - type: shout")
ENV = {"VIDEO_DB_API_KEY": "readme-key", "ALERT_WEBHOOK_URL": "https://hooks.example.com/x",
       "ALERT_SECRET": "readme-secret", "SESSION_API_TOKEN": "readme-token-0123456789", "PIPELINE_HTTP_TOKEN": ""}
CONFIGS = [(line, text) for line, text in BLOCKS if not any(marker in text for marker in OTHER)]


def whole(fragment: str) -> str:
    """The fragment plus whatever top-level keys it leaves out (a processor list item goes under `stages:`)."""
    if fragment.startswith("- "):
        fragment = "stages:\n" + textwrap.indent(fragment, "  ")
    keys = yaml.safe_load(fragment).keys()
    if "source" not in keys:
        source = "{type: videodb}" if "controller" in keys else "{type: replay, path: in.jsonl}"
        fragment += f"source: {source}\n"
    if "controller" in keys and "videodb" not in keys:
        fragment += "videodb: {api_key: readme-key}\n"
    if "sinks" not in keys:
        fragment += "sinks: [{type: console}]\n"
    return fragment + ("" if "name" in keys else "name: readme\n")


def test_the_readme_shows_config_examples() -> None:
    assert len(CONFIGS) >= 12, [line for line, _ in CONFIGS]


@pytest.mark.parametrize(("line", "fragment"), CONFIGS, ids=[f"README.md:{line}" for line, _ in CONFIGS])
def test_a_readme_config_example_validates(tmp_path: Path, line: int, fragment: str) -> None:
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "p.yaml").write_text(whole(fragment))
    load_config(tmp_path / "p.yaml", env=ENV)
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema(_all_stage_classes()))
    assert not [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(whole(fragment)))]
