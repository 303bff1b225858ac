"""Every option of every built-in stage, and of `videodb:` and `runtime:`, is documented in README.md where a reader
looks for it (the stage's own section; the Config reference for the top-level keys), and every option an option
table there names exists."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import RuntimeSettings, VideoDBSettings
from pipeline.registry import BUILTINS, import_path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

#: Where each stage type is described: README text from one marker to the next (several spans are joined).
SECTIONS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("source", "replay"): [("**`replay`**", "**Input limits")],
    ("source", "websocket"): [("**`websocket`**", "**`videodb`**")],
    ("source", "videodb"): [("**`videodb`**", "### Processors"), ("**`websocket`**", "**`videodb`**")],
    ("source", "kafka"): [("### Source `kafka`", "### Scaling out")],
    ("processor", "filter"): [("**`filter`**", "**`enrich`**")],
    ("processor", "enrich"): [("**`enrich`**", "**`rules`**")],
    ("processor", "rules"): [("**`rules`**", "**`window`**")],
    ("processor", "window"): [("**`window`**", "### Sinks")],
    ("sink", "jsonl"): [("**`jsonl`**", "**`console`**")],
    ("sink", "console"): [("**`console`**", "**`alert_forwarder`**")],
    ("sink", "alert_forwarder"): [("**`alert_forwarder`**", "**`parquet`**")],
    ("sink", "parquet"): [("**`parquet`**", "### Controller")],
    ("sink", "kafka"): [("### Sink `kafka`", "### Source `kafka`")],
    ("controller", "capture_session"): [("### Controller", "### Restarts"), ("## Session API", "### Walkthrough")],
}
BUFFER = ("#### Sink buffers", "**`jsonl`**")  # `buffer:` and its keys, shared by every sink
CONFIG_REFERENCE = ("## Config reference", "#### Channels")


def section(start: str, end: str) -> str:
    i = README.index(start)
    return README[i:README.index(end, i + len(start))]


def _models(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def option_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every field, nested option classes (`create_topics.partitions`) included."""
    names = []
    for name, field in model.model_fields.items():
        names.append(prefix + name)
        for sub in _models(field.annotation):
            names += option_names(sub, f"{prefix}{name}.")
    return sorted(set(names))


def documented(name: str, text: str) -> bool:
    """`name` (its last part) appears as an option: in backticks (`x`, `a.x`, `x: 1`, `{x, y}`) or as a YAML key."""
    leaf = re.escape(name.rsplit(".", 1)[-1])
    in_code = rf"`[^`\n]*\n?[^`\n]*\b{leaf}\b[^`\n]*\n?[^`\n]*`"  # a code span may wrap onto the next line
    return any(re.search(p, text) for p in (
        rf"`([\w.]*\.)?{leaf}`", in_code, rf"(?m)^\s*-?\s*{leaf}:", rf"[{{,]\s*{leaf}:"))


def test_the_sections_are_found() -> None:
    for spans in SECTIONS.values():
        for start, end in spans:
            assert len(section(start, end)) > 200, start


@pytest.mark.parametrize("kind_type", sorted(SECTIONS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_stage_option_is_documented_in_its_section(kind_type: tuple[str, str]) -> None:
    kind, type_name = kind_type
    assert set(SECTIONS) == {(k, t) for k, types_ in BUILTINS.items() for t in types_}, "a stage type without a section"
    cls = import_path(BUILTINS[kind][type_name])
    text = "".join(section(a, b) for a, b in SECTIONS[kind_type])
    shared = {"buffer": section(*BUFFER), "start_timeout": section(*CONFIG_REFERENCE)}  # every sink's
    missing = [n for n in option_names(cls.Options) if not documented(n, shared.get(n.split(".")[0], text))]
    assert not missing, f"{kind} {type_name}: options not in its README section: {missing}"


@pytest.mark.parametrize("model,key", [(VideoDBSettings, "videodb"), (RuntimeSettings, "runtime")])
def test_every_top_level_setting_is_in_the_config_reference(model: type[BaseModel], key: str) -> None:
    ref = section(*CONFIG_REFERENCE)
    row = next(line for line in ref.splitlines() if line.startswith(f"| `{key}` |"))
    missing = [n for n in option_names(model) if not documented(n, row)]
    assert not missing, f"{key}: settings not in the Config reference's `{key}` row: {missing}"


def test_every_option_a_table_names_exists() -> None:
    for (kind, type_name), spans in SECTIONS.items():
        names = option_names(import_path(BUILTINS[kind][type_name]).Options)
        known = set(names) | {n.rsplit(".", 1)[-1] for n in names}
        text = section(*spans[0])
        for _header, body in re.findall(r"(?m)^(\| (?:option|`api.` option) \|.*\n)((?:\|.*\n)+)", text):
            for row in body.splitlines()[1:]:
                for name in re.findall(r"`([\w.]+)`", row.split("|")[1]):
                    assert name in known or name.removeprefix("api.") in known, (kind, type_name, name)

