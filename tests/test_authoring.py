"""Rule authoring without silent no-ops: channel checks, every error at once, paths, plugins, CLI details."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
SAMPLE = ROOT / "config/samples/meeting-session.jsonl"

GOOD = """name: t
source: {type: replay, path: in.jsonl}
stages:
  - type: filter
    channels: [transcript, visual_index]
  - type: rules
    rules:
      - {name: r, keywords: [code], channels: [visual_index]}
sinks:
  - {type: jsonl, path: out.jsonl, channels: [alert]}
"""


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*PIPELINE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def config(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    (tmp_path / "in.jsonl").touch()
    return p


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path, text), env={})
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{tmp_path / 'p.yaml'}:") for line in lines), lines
    return lines


# -- 1. channels are checked ------------------------------------------------------------
def test_misspelled_channels_are_errors_with_position_and_hint(tmp_path: Path) -> None:
    text = (GOOD.replace("[transcript, visual_index]", "[visual-index, transcripts]")
            .replace("channels: [visual_index]}", "channels: [visuals]}").replace("[alert]", "[alerts]"))
    lines = errors(tmp_path, text)
    assert any(":5:16: stages[0].channels[0]: unknown channel 'visual-index' (did you mean 'visual_index'?)"
               in ln for ln in lines), lines
    assert any("stages[0].channels[1]: unknown channel 'transcripts' (did you mean 'transcript'?)" in ln
               for ln in lines)
    assert any(":8:" in ln and "stages[1].rules[0].channels[0]: unknown channel 'visuals'" in ln for ln in lines)
    assert any(":10:" in ln and "sinks[0].channels[0]: unknown channel 'alerts' (did you mean 'alert'?)" in ln
               for ln in lines)


def test_known_channels_aliases_lifecycle_and_declared_ones_validate(tmp_path: Path) -> None:
    text = GOOD.replace("[transcript, visual_index]",
                        "[transcript, scene_index, audio_index, alert, capture_session, capture_session.active]")
    load_config(config(tmp_path, text), env={})
    assert "unknown channel 'mood'" in "\n".join(errors(tmp_path, GOOD.replace("[alert]", "[mood]")))
    # a plugin declares the channel it emits: a top-level list, or a class attribute
    load_config(config(tmp_path, GOOD.replace("[alert]", "[mood]") + "channels: [mood]\n"), env={})
    (tmp_path / "moody.py").write_text(
        "from pipeline.api import Processor\n\n"
        "class Mood(Processor):\n    channels = ('mood',)\n\n    def process(self, batch):\n        return batch\n")
    text = GOOD.replace("[alert]", "[mood]").replace("  - type: filter\n", "  - type: moody:Mood\n  - type: filter\n")
    assert load_config(config(tmp_path, text), env={}).stages[0].type_name == "moody:Mood"


def test_a_lifecycle_name_keeps_just_that_event(make_context) -> None:  # type: ignore[no-untyped-def]
    from stages.processors.filter import Filter, FilterOptions

    f = Filter(FilterOptions(channels=["capture_session.active"]), make_context())
    batch = [{"event": "capture_session.active"}, {"event": "capture_session.stopped"}, {"event": ["odd"]},
             {"channel": "transcript", "data": {"text": "x"}}]
    assert f.process(batch) == [batch[0]] and [e for e in batch if f.keep(e)] == [batch[0]]


# -- 2. every error at once ----------------------------------------------------------------
def test_every_error_is_reported_and_a_near_miss_of_a_required_key_is_one_error(tmp_path: Path) -> None:
    text = GOOD.replace("{name: r, keywords: [code],", "{name: r, keyword: [code], cooldown: soon,")
    text = text.replace("source: {type: replay, path: in.jsonl}",
                        "source: {type: replay, path: in.jsonl, batch_size: lots}")
    lines = errors(tmp_path, text)
    assert len(lines) == 3, lines
    assert "source.batch_size: expected an integer, got 'lots'" in lines[0]
    assert "stages[1].rules[0].keyword: unknown key (did you mean 'keywords'?" in lines[1]
    assert "stages[1].rules[0].cooldown: expected a duration like 30s, got 'soon'" in lines[2]
    assert not any("required key is missing" in ln for ln in lines)


def test_errors_stop_at_a_limit_and_say_how_many_more(tmp_path: Path) -> None:
    names = ", ".join(f"chan{i}" for i in range(25))
    lines = errors(tmp_path, GOOD.replace("[alert]", f"[{names}]"))
    assert len(lines) == 21 and all("unknown channel 'chan" in ln for ln in lines[:20]), lines
    assert "sinks[0].channels[0]:" in lines[0] and "sinks[0].channels[19]:" in lines[19]
    assert lines[20] == f"{tmp_path / 'p.yaml'}: ... and 5 more errors"


def test_cli_prints_each_error_on_its_own_line(tmp_path: Path) -> None:
    p = config(tmp_path, GOOD.replace("[alert]", "[alerts]").replace("keywords: [code]", "keywords: []"))
    res = cli("validate", str(p))
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 2 and all(ln.startswith(f"pipeline: {p}:") for ln in lines)
    assert "expected at least 1 item" in res.stderr and "Traceback" not in res.stderr


# -- 3. the schema is usable by editors ----------------------------------------------------
def test_every_shipped_config_validates_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    res = cli("schema")
    schema = json.loads(res.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = sorted(c for c in (ROOT / "config").glob("*.yaml") if not c.name.endswith(".test.yaml"))
    assert len(shipped) >= 3
    for cfg in shipped:
        errs = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(cfg.read_text()))]
        assert not errs, (cfg, errs)
    bad = yaml.safe_load(GOOD.replace("{name: r,", "{name: r, cooldown: soon,"))
    assert list(validator.iter_errors(bad))
    assert not list(validator.iter_errors(yaml.safe_load(GOOD.replace("{name: r,", "{name: r, cooldown: 30s,"))))


# -- 4. module:Class plugins beside the config or in the current directory --------------------
PLUGIN = ("from pipeline.api import Processor\n\n"
          "class Up(Processor):\n    def process(self, batch):\n        return batch\n")


def test_module_class_plugin_is_found_beside_the_config_and_in_cwd(tmp_path: Path) -> None:
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "uplugin.py").write_text(PLUGIN)
    text = GOOD.replace("  - type: filter\n", "  - type: uplugin:Up\n  - type: filter\n")
    p = config(tmp_path / "cfgdir", text)
    res = cli("validate", str(p), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cplugin.py").write_text(PLUGIN)
    p = config(tmp_path / "cfgdir", text.replace("uplugin:Up", "cplugin:Up"))
    assert cli("validate", str(p), cwd=tmp_path / "elsewhere").returncode == 0
    res = cli("validate", str(p), cwd=tmp_path)
    assert res.returncode == 2 and "cannot import module 'cplugin'" in res.stderr
    assert "searched" in res.stderr and "PYTHONPATH" in res.stderr and "Traceback" not in res.stderr


# -- 5. relative paths and input files -----------------------------------------------------------
def test_relative_input_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    d = tmp_path / "proj"
    d.mkdir()
    (d / "session.jsonl").write_bytes(SAMPLE.read_bytes())
    out = tmp_path / "out.jsonl"
    p = d / "p.yaml"
    p.write_text(f"name: rel\nsource: {{type: replay, path: session.jsonl}}\nsinks: [{{type: jsonl, path: {out}}}]\n")
    res = cli("run", str(p), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(out.read_text().splitlines()) == len(SAMPLE.read_text().splitlines())


def test_validate_reports_a_missing_input_file_and_an_unwritable_output(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    p = tmp_path / "p.yaml"
    p.write_text("name: v\nsource: {type: replay, path: nope.jsonl}\n"
                 f"sinks: [{{type: jsonl, path: {ro}/x/y.jsonl}}]\n")
    res = cli("validate", str(p))
    assert res.returncode == 2, res.stdout
    assert f"source.path: input file {tmp_path / 'nope.jsonl'} does not exist" in res.stderr
    if os.geteuid() != 0:  # root writes anywhere
        assert "sinks[0].path: cannot write" in res.stderr


def test_validate_refuses_the_symlinks_a_run_refuses(tmp_path: Path) -> None:
    """A symlinked directory in an output path, or as the `state_dir` of a pipeline that resumes, is refused
    by `pipeline run`; `validate` said ok to both."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    p = tmp_path / "p.yaml"
    p.write_text(f"name: v\nsource: {{type: websocket, url: 'ws://127.0.0.1:9'}}\nstate_dir: {tmp_path}/linked\n"
                 f"sinks: [{{type: jsonl, path: {tmp_path}/linked/out/y.jsonl}}]\n")
    res = cli("validate", str(p))
    assert res.returncode == 2, res.stdout
    assert f"p.yaml:3:1: state_dir: cannot use {tmp_path}/linked: {tmp_path}/linked is a symlink" in res.stderr
    assert f"sinks[0].path: cannot write {tmp_path}/linked/out/y.jsonl: {tmp_path}/linked is a symlink (-> {real})" \
        in res.stderr
    run = cli("run", str(p))
    assert run.returncode != 0 and "symlink" in run.stderr
    p.write_text(f"name: v\nsource: {{type: replay, path: {SAMPLE}}}\nstate_dir: {tmp_path}/linked\n"
                 f"sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]\n")  # a replay does not use its state_dir
    res = cli("validate", str(p))
    assert res.returncode == 0, res.stderr


# -- 6. clear: true keeps the previous results when the source never opens ------------------------------
def test_clear_true_does_not_wipe_results_when_the_replay_path_is_wrong(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"previous": 1}\n')
    p = tmp_path / "p.yaml"
    p.write_text(f"name: c\nsource: {{type: replay, path: '${{SRC}}'}}\n"
                 f"sinks: [{{type: jsonl, path: {out}, clear: true}}]\n")
    res = cli("run", str(p), cwd=tmp_path, env={"SRC": str(tmp_path / "typo.jsonl")})
    assert res.returncode != 0 and out.read_text() == '{"previous": 1}\n'
    res = cli("run", str(p), cwd=tmp_path, env={"SRC": str(SAMPLE)})
    assert res.returncode == 0, res.stderr
    assert "previous" not in out.read_text() and len(out.read_text().splitlines()) == 83


# -- 8. validate works without secrets, lists disabled stages, shows videodb masked ---------------------
def test_validate_offline_without_the_api_key(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    res = subprocess.run([*PIPELINE, "validate", "config/meeting.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "VIDEO_DB_API_KEY is not set" in res.stderr
    assert "--offline" in res.stderr and ":-default" not in res.stderr
    res = subprocess.run([*PIPELINE, "validate", "--offline", "config/meeting.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "placeholders: VIDEO_DB_API_KEY" in res.stdout
    assert "videodb: api_key=${VIDEO_DB_API_KEY} (placeholder) base_url=https://api.videodb.io" in res.stdout
    assert any("sinks[3]:kafka" in ln and "(disabled)" in ln for ln in res.stdout.splitlines())
    res = subprocess.run([*PIPELINE, "validate", "config/meeting.yaml"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "VIDEO_DB_API_KEY": "sk-live-abcdef"})
    assert res.returncode == 0 and "api_key=***" in res.stdout and "sk-live-abcdef" not in res.stdout


def test_validate_offline_says_when_a_placeholder_cannot_stand_in(tmp_path: Path) -> None:
    """A webhook URL is often the secret itself; its placeholder used to fail as "got ':///***'"."""
    p = tmp_path / "p.yaml"
    p.write_text("name: o\nsource: {type: replay, path: in.jsonl}\n"
                 "stages: [{type: rules, rules: [{name: r, keywords: [x], cooldown: '${COOLDOWN}'}]}]\n"
                 "sinks:\n  - {type: alert_forwarder, url: '${SLACK_WEBHOOK_URL}'}\n"
                 "  - {type: alert_forwarder, url: 'https://hooks.example/${HOOK_PATH}'}\n")
    (tmp_path / "in.jsonl").touch()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    res = subprocess.run([*PIPELINE, "validate", "--offline", str(p)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"pipeline: {p}:3:57: stages[0].rules[0].cooldown: COOLDOWN is not set, and its --offline placeholder is "
        "not a valid value here; export it, or give it a default: ${COOLDOWN:-value}",
        f"pipeline: {p}:5:29: sinks[0].url: SLACK_WEBHOOK_URL is not set, and its --offline placeholder is "
        "not a valid value here; export it, or give it a default: ${SLACK_WEBHOOK_URL:-value}"]


# -- 9. the smaller ones ------------------------------------------------------------------------------
def test_output_into_head_has_no_traceback() -> None:
    # the schema (~100 kB) overflows the pipe, so the writer always sees the reader gone
    res = subprocess.run(f"{sys.executable} -m pipeline.cli schema | head -1; "
                         f"{sys.executable} -m pipeline.cli validate --offline config/meeting.yaml | head -1",
                         shell=True, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert len(res.stdout.splitlines()) == 2


def test_version() -> None:
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("pipeline 0.")


def test_test_plugin_is_not_in_pipeline_stages() -> None:
    res = cli("stages")
    assert res.returncode == 0 and "filter" in res.stdout and "shout" not in res.stdout


def test_stages_verbose_lists_match_values_and_no_design_doc() -> None:
    res = cli("stages", "-v")
    assert "DESIGN" not in res.stdout
    match = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("match "))
    assert "word, substring, regex" in match


def test_summary_counts_printed_lines_and_no_rules_line_without_rules(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(f"name: s\nsource: {{type: replay, path: {SAMPLE}}}\n"
                 "stages:\n  - type: rules\n    rules: [{name: r, keywords: [code]}]\n"
                 "sinks: [{type: console, alerts_only: true}]\n")
    res = cli("run", str(p), cwd=tmp_path)
    printed = len(res.stdout.splitlines())
    line = next(ln for ln in res.stderr.splitlines() if "sinks[0]:console" in ln)
    assert line.split()[1:3] == ["written", str(printed)], (line, printed)
    assert "alerts fired by rules:" in res.stderr
    p.write_text(f"name: s\nsource: {{type: replay, path: {SAMPLE}}}\nsinks: [{{type: console}}]\n")
    res = cli("run", str(p), cwd=tmp_path)
    assert res.returncode == 0 and "alerts fired by rules" not in res.stderr


def test_every_unset_variable_is_reported(tmp_path: Path) -> None:
    text = GOOD.replace("path: in.jsonl}", "path: '${IN_FILE}'}").replace("path: out.jsonl", "path: '${OUT_FILE}'")
    lines = errors(tmp_path, text)
    assert len(lines) == 2 and "IN_FILE is not set" in lines[0] and "OUT_FILE is not set" in lines[1]
    assert ":2:" in lines[0] and ":10:" in lines[1]


def test_a_missing_input_file_is_reported_at_its_own_key_not_at_the_stage(tmp_path: Path) -> None:
    """README: every error comes with file, line, column and key path. A missing replay `path`, emulator
    `scenario` or webhook `ca_file` was reported at the line of `source:` (or with no line at all for
    `videodb.emulator.scenario`), not at the key that names the file."""
    from pipeline.validate import file_problems
    p = tmp_path / "p.yaml"
    p.write_text("name: v\nvideodb:\n  emulator:\n    scenario: gone.yaml\nsource:\n  type: replay\n"
                 "  path: nope.jsonl\nsinks:\n  - type: alert_forwarder\n    url: https://example.com/hook\n"
                 "    ca_file: no-ca.pem\n")
    assert file_problems(load_config(p)) == [
        f"{p}:4:5: videodb.emulator.scenario: input file {tmp_path / 'gone.yaml'} does not exist",
        f"{p}:7:3: source.path: input file {tmp_path / 'nope.jsonl'} does not exist",
        f"{p}:11:5: sinks[0].ca_file: input file {tmp_path / 'no-ca.pem'} does not exist"]
