"""Option values at the edges: every one is a config line with its key path, never a crash at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError


def config_errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """Write `text` as p.yaml (beside an empty in.jsonl) and return its path and the error lines it gets."""
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p, env=env or {})
    return p, str(info.value).splitlines()


def test_a_whole_number_past_int64_is_a_config_error_not_a_crash_at_run_time(tmp_path: Path) -> None:
    """`batch_size: 99999999999999999999999` validated, and `pipeline run` then failed in the replay source
    (`ValueError: Stop argument for islice() must be ... <= sys.maxsize`) before reading anything."""
    p, errors = config_errors(tmp_path, "name: x\nsource: {type: replay, path: in.jsonl, batch_size: "
                              "99999999999999999999999}\nstages: [{type: filter, min_text_length: short}]\n"
                              "sinks: [{type: console}]\n")
    assert errors == [  # every error at once, each with its key path
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


def test_a_default_may_hold_a_variable_and_a_malformed_reference_is_an_error(tmp_path: Path) -> None:
    """`${OUT:-${HOME_DIR}/x}` gave the literal text `${HOME_DIR}/x` (its default stopped at the first `}`), and
    `${OUT-out}` (shell syntax) or `${ OUT }` stayed in the value as written: a file named `${OUT-out}` was
    created, a URL went out with it. Now nested defaults work and anything else after `${` is an error, reported
    with every other error of the file."""
    p, lines = config_errors(
        tmp_path, "name: x\nsource: {type: replay, path: in.jsonl}\n"
        "stages: [{type: enrich, fields: {a: '${A:-${B}/x}', b: '${C:-${D:-d}}', c: '${NOPE}'}}]\n"
        "sinks:\n  - {type: jsonl, path: '${OUT-out/x.jsonl}'}\n  - {type: console, max_text: lots}\n",
        {"B": "/home/b"})
    assert lines == [f"{p}:3:76: environment variable NOPE is not set (export it, or give a default: "
                     "${NOPE:-value})",
                     f"{p}:5:25: '${{OUT-out/x.jsonl}}' is not a variable reference: write ${{NAME}} or "
                     "${NAME:-default} ($$ for a literal $)",
                     f"{p}:6:21: sinks[1].max_text: expected an integer, got 'lots'"], lines
    p.write_text(p.read_text().replace("${OUT-out/x.jsonl}", "${OUT:-out/x.jsonl}").replace("lots", "50")
                 .replace(", c: '${NOPE}'", ""))
    cfg = load_config(p, env={"B": "/home/b"})
    assert cfg.stages[0].options.fields == {"a": "/home/b/x", "b": "d"}  # type: ignore[attr-defined]
    assert cfg.sinks[0].options.path == "out/x.jsonl"  # type: ignore[attr-defined]


def test_validate_lists_more_than_ten_stages_in_their_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The listing was sorted as text: stages[10] and stages[11] came between stages[1] and stages[2]."""
    from pipeline.cli import main

    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nsource: {type: replay, path: in.jsonl}\nstages:\n"
                 + "".join(f"  - {{type: filter, min_text_length: {i}}}\n" for i in range(12))
                 + "sinks: [{type: console}]\n")
    assert main(["validate", str(p)]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  stages[")]
    assert listed == [f"stages[{i}]:filter" for i in range(12)]


def test_a_key_written_beside_a_merge_key_overrides_the_merged_one(tmp_path: Path) -> None:
    """`- <<: *js` then `path: out/b.jsonl` (YAML's way to reuse a sink's settings) was refused as
    "duplicate key 'path'"; a key really written twice is still an error, at the second one."""
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    body = ("name: m\nsource: {type: replay, path: in.jsonl}\nsinks:\n"
            "  - &js {type: jsonl, path: out/a.jsonl, flush_interval: 0}\n"
            "  - <<: *js\n    path: out/b.jsonl\n")
    p.write_text(body)
    cfg = load_config(p, env={})
    assert [(s.options.path, s.options.flush_interval) for s in cfg.sinks] == [  # type: ignore[attr-defined]
        ("out/a.jsonl", 0), ("out/b.jsonl", 0)]
    p.write_text(body + "  - {<<: *js, path: out/c.jsonl, path: out/d.jsonl}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert str(info.value) == f"{p}:7:34: sinks[2].path: duplicate key (written twice in one mapping)"


def test_a_secret_variable_is_masked_wherever_it_lands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only options typed as secrets were masked: a `${WS_TOKEN}` in a websocket URL's query was printed by
    `pipeline validate`, and a `${SLACK_TOKEN}` put in a wrong field was printed in its error. A variable whose
    name says it is a secret (KEY, SECRET, TOKEN, PASSWORD...) is masked wherever it is used."""
    from pipeline.cli import main

    monkeypatch.setenv("WS_TOKEN", "tok-3f9a1c77e0")
    monkeypatch.setenv("SLACK_TOKEN", "xoxb-7c1d22a9b4")
    p = tmp_path / "p.yaml"
    p.write_text('name: x\nsource: {type: websocket, url: "wss://h.example/ws?token=${WS_TOKEN}"}\n'
                 "sinks: [{type: console}]\n")
    assert main(["validate", str(p)]) == 0
    p.write_text(p.read_text().replace("{type: console}", '{type: console, max_text: "${SLACK_TOKEN}"}'))
    assert main(["validate", str(p)]) == 2
    out = capsys.readouterr()
    assert "ws?token=***" in out.out and "max_text: expected an integer, got '***'" in out.err
    assert "tok-3f9a1c77e0" not in out.out + out.err and "xoxb-7c1d22a9b4" not in out.out + out.err


def test_a_webhook_path_is_shown_as_host_slash_stars(tmp_path: Path) -> None:
    """README: a webhook URL's path is shown as `https://host/***`. `pipeline validate` printed
    `https://hooks.example***` (the path's slash went with the secret), and meeting.yaml's
    `http://127.0.0.1:9/disabled` as `http://127.0.0.1:9***`, a port that looked masked. (A process of its own:
    secrets other tests registered would be masked in these URLs too.)"""
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nsource: {type: replay, path: in.jsonl}\nsinks:\n"
                 "  - {type: alert_forwarder, url: 'https://hooks.example/services/T0/B0/x1y2z3'}\n"
                 "  - {type: alert_forwarder, url: 'http://127.0.0.1:9/disabled'}\n")
    (tmp_path / "in.jsonl").write_text("")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(p)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert '"url": "https://hooks.example/***"' in out and '"url": "http://127.0.0.1:9/***"' in out, out
    assert "T0/B0" not in out and "disabled" not in out


def test_a_bad_enabled_does_not_hide_the_stages_other_errors(tmp_path: Path) -> None:
    """`enabled: maybe` stopped the stage's check: its other errors came one run of validate later."""
    p, errors = config_errors(tmp_path, "name: x\nsource: {type: replay, path: in.jsonl}\nstages: [{type: filter, "
                              "enabled: maybe, min_text_length: short}]\nsinks: [{type: console}]\n")
    assert errors == [f"{p}:3:25: stages[0].enabled: expected true or false, got 'maybe'",
                                            f"{p}:3:41: stages[0].min_text_length: expected an integer, got 'short'"]


def test_a_blank_dead_letter_path_is_an_error(tmp_path: Path) -> None:
    """`dead_letter: '   '` was accepted and the run wrote its rejects to a file named by three spaces."""
    p, errors = config_errors(tmp_path, "name: x\nsource: {type: replay, path: in.jsonl}\nsinks: [{type: console}]\n"
                              "dead_letter: '   '\n")
    assert errors == [f"{p}:4:1: dead_letter: expected a file path, got '   '"]


def test_an_unquoted_variable_keeps_its_text_where_a_string_is_expected(tmp_path: Path) -> None:
    """`collection_id: ${COLL}` with COLL=42 (or an API key of digits, or `yes`) was read by YAML as a number or
    a boolean and refused ("expected a string, got 42"); `0123` or `1_000` would even have become other numbers.
    A string option gets the variable's text as it is; a number option still gets the number."""
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text("name: ${NAME}\nvideodb:\n  api_key: ${KEY}\n  collection_id: ${COLL}\n"
                 "source: {type: replay, path: in.jsonl}\nstages:\n  - type: rules\n    rules:\n"
                 "      - name: r\n        keywords:\n          - ${WORD}\nsinks:\n  - type: console\n"
                 "    max_text: ${WIDTH}\n")
    cfg = load_config(p, env={"NAME": "2024", "KEY": "0123", "COLL": "1_000", "WORD": "yes", "WIDTH": "80"})
    assert cfg.name == "2024" and cfg.videodb.collection_id == "1_000"
    assert cfg.videodb.api_key is not None and cfg.videodb.api_key.get_secret_value() == "0123"
    assert cfg.stages[0].options.rules[0].keywords == ["yes"]  # type: ignore[attr-defined]
    assert cfg.sinks[0].options.max_text == 80  # type: ignore[attr-defined]


@pytest.mark.parametrize(("line", "expected"), [
    ("  - {type: console, max_text: !!int lots}", "3:31: sinks[0].max_text: 'lots' is not a valid int"),
    ("  - {type: console, max_text: !!timestamp 2020-13-45}",
     "3:31: sinks[0].max_text: '2020-13-45' is not a valid timestamp"),
    ("  - {type: console, max_text: !!python/name:os.system ''}",
     "3:31: sinks[0].max_text: tag 'tag:yaml.org,2002:python/name:os.system' is not allowed (plain YAML only)"),
    ("  - {type: console, max_text: 1, max_text: 2}", "3:34: sinks[0].max_text: duplicate key (written twice in "
                                                    "one mapping)"),
])
def test_yaml_level_errors_name_their_key_path(tmp_path: Path, line: str, expected: str) -> None:
    """`!!int lots` raised ValueError out of PyYAML's constructor: a traceback. Tags, duplicate keys and non-string
    keys said where but not which key (`p.yaml:3:31: could not determine a constructor for the tag ...`)."""
    p = tmp_path / "p.yaml"
    p.write_text(f"name: x\nsinks:\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert str(info.value) == f"{p}:{expected}"


def test_unset_variables_and_the_files_other_errors_come_at_once(tmp_path: Path) -> None:
    """An unset variable stopped the check: the file's other errors came one `export` later. Now they come
    together, in file order; an error that is only the unset variable's doing (its value cannot be checked)
    is not repeated."""
    p, errors = config_errors(
        tmp_path, "name: x\nsource: {type: replay, path: in.jsonl}\nstages: [{type: filter, min_text_length: short}]\n"
        'sinks: [{type: alert_forwarder, url: "${HOOK}"}, {type: console, max_text: "${W}"}]\nbogus: 1\n')
    assert errors == [
        f"{p}:3:25: stages[0].min_text_length: expected an integer, got 'short'",
        f"{p}:4:38: environment variable HOOK is not set (export it, or give a default: ${{HOOK:-value}})",
        f"{p}:4:76: environment variable W is not set (export it, or give a default: ${{W:-value}})",
        f"{p}:5:1: bogus: unknown key; expected one of: name, videodb, source, controller, stages, sinks, runtime, "
        "dead_letter, dead_letter_max_bytes, state_dir, channels"]


def test_a_quoted_variable_in_a_flow_mapping_may_be_a_number_or_a_boolean(tmp_path: Path) -> None:
    """README: `enabled: ${KAFKA_SINK:-false}` works on every stage, and inside `{...}` a variable must be quoted.
    Quoted, it was a string, so `{type: console, enabled: "${ON:-false}"}` was "expected true or false, got
    'false'" (and likewise every number): a flow-style stage could not take them from the environment at all.
    Now such a value is read as YAML reads it unquoted where the option is not a string; an option that takes
    anything (enrich `fields`) keeps the quoted text."""
    p = tmp_path / "p.yaml"
    p.write_text('name: x\nsource: {type: replay, path: in.jsonl, batch_size: "${BS:-64}"}\n'
                 'stages: [{type: enrich, fields: {build: "${BUILD:-0123}"}}]\n'
                 'runtime: {queue_size: "${QS:-8}", drain_timeout: "${DT:-5s}"}\n'
                 'sinks:\n  - {type: console, enabled: "${ON:-false}", max_text: "${MT:-80}"}\n'
                 '  - {type: jsonl, path: "${OUT:-out}/x.jsonl"}\n')
    (tmp_path / "in.jsonl").write_text("")
    cfg = load_config(p, env={})
    assert [s.type_name for s in cfg.disabled] == ["console"]
    assert (cfg.source.options.batch_size, cfg.runtime.queue_size, cfg.runtime.drain_timeout) == (64, 8, 5.0)
    assert cfg.stages[0].options.fields == {"build": "0123"}
    assert cfg.disabled[0].options.max_text == 80
    cfg = load_config(p, env={"ON": "true", "OUT": "0123"})
    assert [s.type_name for s in cfg.sinks] == ["console", "jsonl"] and str(cfg.sinks[1].options.path) == "0123/x.jsonl"
    with pytest.raises(ConfigError) as info:
        load_config(p, env={"ON": "maybe", "MT": "lots"})
    assert str(info.value).splitlines() == [f"{p}:6:21: sinks[0].enabled: expected true or false, got 'maybe'",
                                            f"{p}:6:46: sinks[0].max_text: expected an integer, got 'lots'"]


BROKEN = """name: meeting
source:
  type: replai
  path: x.jsonl
stages:
  - type: filter
    chanels: [transcript]
  - type: filter
    channels: [transcript, transcripts]
  - type: rules
    rules:
      - name: a
        keywords: [x]
        cooldown: soon
      - name: b
        keyword: [x]
sinks:
  - type: console
runtime:
  queue_size: lots
"""


def test_the_readme_error_example_is_what_validate_prints(tmp_path: Path) -> None:
    """The README's example of every error at once is the real output for BROKEN (it named config/meeting.yaml
    with lines and columns no file gave)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme[readme.index("```\npipeline: p.yaml:") + 4:]
    shown = shown[:shown.index("```")]
    (tmp_path / "p.yaml").write_text(BROKEN)
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", "p.yaml"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 2
    for want, got in zip(shown.splitlines(), res.stderr.splitlines(), strict=True):
        assert got == want or (want.endswith("; ...") and got.startswith(want[:-3])), (want, got)


def test_a_name_that_starts_with_a_dot_says_what_a_name_must_start_with(tmp_path: Path) -> None:
    """`name: .x` was refused as not "letters, digits, _.-", which it is: a name must start with a letter or digit."""
    p, lines = config_errors(tmp_path, "name: .x\nsource: {type: replay, path: in.jsonl}\nsinks: [{type: console}]\n")
    assert lines == [f"{p}:1:1: name: expected a pipeline name (letters, digits, _.-, starting with a letter or "
                     "digit), got '.x'"]


def test_an_infinite_speed_is_a_config_error_like_an_infinite_duration(tmp_path: Path) -> None:
    """README: `.inf`, `.nan` and numbers past a float's range are errors. `speed: .inf` (or `1e400`) on a replay
    source or the in-process emulator validated as `Infinity`, while `pipeline emulate --speed inf` is refused."""
    p, errors = config_errors(tmp_path, "name: x\nvideodb: {emulator: {speed: .inf}}\n"
                              "source: {type: replay, path: in.jsonl, speed: 1e400}\nsinks: [{type: console}]\n")
    assert errors == [f"{p}:2:22: videodb.emulator.speed: expected a finite number, got inf",
                      f"{p}:3:40: source.speed: expected a finite number, got '1e400'"]
