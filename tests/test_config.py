from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.yamlpos import load

BASE = """name: t
source: {type: replay, path: x.jsonl}
stages:
  - type: filter
    channels: [transcript]
  - type: rules
    rules:
      - name: r
        keywords: [code]
        cooldown: %s
sinks:
  - {type: jsonl, path: out/x.jsonl}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env or {})
    msg = str(info.value)
    assert all(line.startswith(str(tmp_path / "p.yaml") + ":") for line in msg.splitlines()), msg
    return msg


def test_valid_config_resolves_stages(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE % "30s"), env={})
    assert [s.type_name for s in cfg.stages] == ["filter", "rules"]
    assert cfg.stages[1].options.rules[0].cooldown == 30.0  # type: ignore[attr-defined]
    assert cfg.dead_letter == Path("out/t/dead-letter.jsonl")


def test_bad_duration_names_file_line_and_key_path(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE % "soon")
    assert msg.startswith(f"{tmp_path / 'p.yaml'}:10:")
    assert "stages[1].rules[0].cooldown" in msg
    assert "expected a duration like 30s" in msg and "'soon'" in msg


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("channels: [transcript]", "chanels: [transcript]") % "1s")
    assert ":5:5: stages[0].chanels: unknown key (did you mean 'channels'?)" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("keywords: [code]", "keywords: [code]\n        severty: high") % "1s")
    assert "stages[1].rules[0].severty: unknown key (did you mean 'severity'?)" in msg
    assert ":10:9:" in msg


def test_unknown_stage_type_did_you_mean(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("type: filter", "type: filtr") % "1s")
    assert "stages[0].type: unknown processor type 'filtr' (did you mean 'filter'?)" in msg
    assert ":4:" in msg


def test_unknown_names_far_from_any_list_what_is_known(tmp_path: Path) -> None:
    """With no close name, every "unknown" error lists the choices in the same words."""
    from pipeline.errors import suggest

    msg = error_of(tmp_path, BASE.replace("type: filter", "type: zzzz") % "1s")
    assert "unknown processor type 'zzzz'; expected one of: " in msg and "rules" in msg
    assert "unknown key; expected one of: name, " in error_of(tmp_path, BASE % "1s" + "qqqqqq: []\n")
    assert suggest("x", []) == "" and suggest("x", ["abc"], shown=["shown"]) == "; expected one of: shown"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert "sink: unknown key (did you mean 'sinks'?)" in error_of(tmp_path, BASE % "1s" + "sink: []\n")


def test_env_interpolation(tmp_path: Path) -> None:
    text = BASE.replace("path: x.jsonl}", "path: '${EV_PATH}'}")
    text = text.replace("out/x.jsonl", "'${OUT:-out/default.jsonl}'") % "1s"
    cfg = load_config(write(tmp_path, text), env={"EV_PATH": "events.jsonl"})
    assert cfg.source.options.path == str(tmp_path / "events.jsonl")  # type: ignore[attr-defined]
    assert cfg.sinks[0].options.path == "out/default.jsonl"  # type: ignore[attr-defined]


def test_missing_env_var_names_it_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("path: x.jsonl}", "path: '${NOPE_VAR}'}") % "1s")
    assert ":2:" in msg and "NOPE_VAR is not set" in msg


def test_plain_interpolated_scalars_get_types(tmp_path: Path) -> None:
    data, _ = load("a: ${N:-4}\nb: '${N:-4}'\n", "f", {})
    assert data == {"a": 4, "b": "4"}


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: t\nsource: [unclosed\n")
    assert "invalid YAML" in msg and "p.yaml:" in msg


def test_unsafe_yaml_tags_are_rejected(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    assert "p.yaml:1:" in msg


def test_plugin_by_entry_point_and_module_path(tmp_path: Path) -> None:
    for type_name in ("shout", "demo_plugin:Shout"):
        text = BASE.replace("type: filter", f"type: {type_name}") % "1s"
        cfg = load_config(write(tmp_path, text), env={})
        assert cfg.stages[0].cls.__name__ == "Shout"


def test_plugin_of_wrong_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("type: jsonl", "type: demo_plugin:Shout") % "1s")
    assert "sinks[0].type" in msg and "not a sink" in msg


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["name", "source", "stages", "sinks", "runtime", "videodb", "x"]),
                           yaml_values, max_size=6))
def test_random_documents_only_raise_config_errors(tmp_path: Path, doc: dict[str, object]) -> None:
    try:
        load_config(write(tmp_path, yaml.safe_dump(doc)), env={})
    except ConfigError as exc:
        assert all(line.startswith(str(tmp_path / "p.yaml")) for line in str(exc).splitlines())


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=st.text(max_size=80))
def test_random_text_only_raises_config_errors(tmp_path: Path, text: str) -> None:
    try:
        load_config(write(tmp_path, text), env={})
    except ConfigError as exc:
        assert str(tmp_path / "p.yaml") in str(exc)


def test_enabled_false_skips_a_stage(tmp_path: Path) -> None:
    text = BASE.replace("  - type: filter\n", "  - type: filter\n    enabled: ${F:-false}\n") % "1s"
    cfg = load_config(write(tmp_path, text), env={})
    assert [s.type_name for s in cfg.stages] == ["rules"] and cfg.stages[0].path == "stages[1]"
    assert [s.type_name for s in load_config(write(tmp_path, text), env={"F": "true"}).stages] == ["filter", "rules"]
    assert "stages[0].enabled: expected true or false" in error_of(tmp_path, text, {"F": "maybe"})


VALID = {
    "name": "fuzz",
    "source": {"type": "replay", "path": "x.jsonl", "speed": 0},
    "stages": [{"type": "filter", "channels": ["transcript"], "final_only": True},
               {"type": "rules", "rules": [{"name": "r", "keywords": ["code"], "cooldown": "30s",
                                            "window": "1m", "min_count": 2}]},
               {"type": "enrich", "fields": {"a": 1}}],
    "sinks": [{"type": "jsonl", "path": "out/x.jsonl", "channels": ["alert"], "flush_interval": "1s"},
              {"type": "alert_forwarder", "url": "https://example.invalid/hook", "rate_limit": "10/min"}],
    "runtime": {"engine": "local", "queue_size": 4},
}
SUBTREES = [("source",), ("stages", 0), ("stages", 1), ("stages", 1, "rules", 0), ("stages", 2),
            ("sinks", 0), ("sinks", 1), ("runtime",)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(where=st.sampled_from(SUBTREES), key=st.text(min_size=1, max_size=12) | st.sampled_from(
    ["type", "path", "speed", "channels", "keywords", "cooldown", "window", "min_count", "match", "url",
     "rate_limit", "flush_interval", "queue_size", "engine", "enabled"]), value=yaml_values)
def test_one_mutated_subtree_only_raises_config_errors(tmp_path: Path, where: tuple, key: str,
                                                       value: object) -> None:
    import copy

    doc = copy.deepcopy(VALID)
    node: object = doc
    for part in where:
        node = node[part]  # type: ignore[index]
    node[key] = value  # type: ignore[index]
    try:
        load_config(write(tmp_path, yaml.safe_dump(doc)), env={})
    except ConfigError as exc:
        assert all(line.startswith(str(tmp_path / "p.yaml")) for line in str(exc).splitlines()), str(exc)


def test_a_key_ending_in_a_newline_is_quoted(tmp_path: Path) -> None:
    """Found by hypothesis: `$` matched before a trailing newline, so the key was printed raw."""
    msg = error_of(tmp_path, BASE % "1s" + 'runtime: {"0\\n": 1}\n')
    assert "runtime['0\\n']: unknown key" in msg


@pytest.mark.parametrize("every", ["1ms", "0.5s"])
def test_a_status_interval_under_a_second_is_refused(tmp_path: Path, every: str) -> None:
    """A status line every millisecond would flood the log: 0 turns it off, else at least a second."""
    msg = error_of(tmp_path, BASE % "1s" + f"runtime: {{status_interval: {every}}}\n")
    assert "runtime.status_interval" in msg and "at least 1s" in msg and "0 turns it off" in msg


@pytest.mark.parametrize(("every", "seconds"), [("0", 0.0), ("1s", 1.0), ("5m", 300.0)])
def test_a_status_interval_of_0_or_a_second_and_more_is_taken(tmp_path: Path, every: str, seconds: float) -> None:
    cfg = load_config(write(tmp_path, BASE % "1s" + f"runtime: {{status_interval: {every}}}\n"), env={})
    assert cfg.runtime.status_interval == seconds


@pytest.mark.parametrize("where", ["videodb", "source"])
def test_a_malformed_videodb_base_url_is_a_config_error(tmp_path: Path, where: str) -> None:
    """Before: taken as written; `pipeline run` then retried its connect with backoff, for ever."""
    source = "{type: videodb, base_url: notaurl}" if where == "source" else "{type: videodb}"
    videodb = "{api_key: k}" if where == "source" else "{api_key: k, base_url: notaurl}"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: t\nvideodb: {videodb}\nsource: {source}\nsinks: [{{type: console}}]\n")
    with pytest.raises(ConfigError, match=r"base_url: .*expected an http\(s\) URL such as https://api.videodb.io"):
        load_config(path)


@pytest.mark.parametrize("source", ['{type: websocket, url: "ws://127.0.0.1:9/"', "{type: videodb"])
@pytest.mark.parametrize("option", ["backoff_initial", "backoff_max"])
def test_a_reconnect_backoff_of_0_is_refused(tmp_path: Path, source: str, option: str) -> None:
    """Before: taken; while the server was down the source then reconnected with no delay at all, for ever."""
    text = f"name: t\nvideodb: {{api_key: k}}\nsource: {source}, {option}: 0s}}\nsinks: [{{type: console}}]\n"
    msg = error_of(tmp_path, text)
    assert len(msg.splitlines()) == 1 and f"source.{option}: expected a number > 0" in msg, msg


@pytest.mark.parametrize(("stage", "option"), [
    ("{type: alert_forwarder, url: http://127.0.0.1:9/", "backoff_initial"),
    ("{type: alert_forwarder, url: http://127.0.0.1:9/", "backoff_max"),
    ("{type: kafka, bootstrap_servers: 127.0.0.1:9, topic: t", "retry_backoff"),
    ("{type: kafka, bootstrap_servers: 127.0.0.1:9, topic: t", "max_retry_backoff"),
])
def test_a_sink_retry_backoff_of_0_is_refused(tmp_path: Path, stage: str, option: str) -> None:
    """Before: taken; a webhook that failed got every retry at once, a Kafka sink retried as fast as it could."""
    text = f"name: t\nsource: {{type: replay, path: x.jsonl}}\nsinks: [{stage}, {option}: 0s}}]\n"
    (tmp_path / "x.jsonl").write_text("")
    msg = error_of(tmp_path, text)
    assert len(msg.splitlines()) == 1 and f"sinks[0].{option}: expected a number > 0" in msg, msg


def test_a_kafka_source_retry_backoff_of_0_is_refused(tmp_path: Path) -> None:
    text = "name: t\nsource: {type: kafka, bootstrap_servers: 127.0.0.1:9, topic: t, retry_backoff: 0s}\n" \
           "sinks: [{type: console}]\n"
    msg = error_of(tmp_path, text)
    assert len(msg.splitlines()) == 1 and "source.retry_backoff: expected a number > 0" in msg, msg
