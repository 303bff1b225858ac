"""`pipeline test`: the shipped rule tests pass; failures show a diff and exit 1; JUnit XML for CI."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEO_DB")}  # tests need no secrets
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "test", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT)})


def test_shipped_rule_tests_pass(tmp_path: Path) -> None:
    res = run("config/", "--junit", str(tmp_path / "junit.xml"))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert sum(ln.startswith("ok ") for ln in lines) >= 9
    assert any("config/meeting.test.yaml" in ln for ln in lines) and any("config/demo.test.yaml" in ln for ln in lines)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("failures") == "0" and int(root.get("tests", "0")) >= 9


CASES = """config: p.yaml
cases:
  - name: passes
    input:
      - {channel: visual_index, rtstream_id: s1, at: 0s, data: {text: "a terminal"}}
      - {channel: visual_index, rtstream_id: s1, at: 10s, data: {text: "the terminal again"}}
    expect:
      alerts: [{label: term, rtstream: s1, matched: [terminal], count: 1}]
      events_out: [{channel: visual_index, data: {text: "a terminal"}}]
  - name: wrong expectations
    input_file: events.jsonl
    expect:
      alerts: [{label: term, count: 2}]
      events_out: [{channel: visual_index, data: {text: "a terminl"}}]
      dropped: 1
  - name: only the rules stage
    stages: [rules]
    input: [{channel: audio_index, data: {text: "terminal"}}]
    expect: {no_alerts: true, dropped: 0}
"""
CONFIG = """name: p
source: {type: replay, path: none.jsonl}
stages:
  - {type: filter, channels: [visual_index]}
  - type: rules
    rules: [{name: term, keywords: [terminal], channels: [visual_index], cooldown: 1m}]
sinks: [{type: console}]
"""


def test_failures_show_what_differs_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text(CASES)
    (tmp_path / "events.jsonl").write_text('{"channel": "visual_index", "rtstream_id": "s1", '
                                           '"data": {"text": "a terminal", "start": 5}}\n')
    res = run(str(tmp_path), "--junit", str(tmp_path / "j.xml"), cwd=tmp_path.parent)
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert f"ok    {tmp_path}/p.test.yaml: passes" in out
    assert f"FAIL  {tmp_path}/p.test.yaml: wrong expectations" in out
    assert f"ok    {tmp_path}/p.test.yaml: only the rules stage" in out
    assert "expected 2 alert(s) (label='term'), got 1; fired:" in out
    assert "term [info] on s1 matched ['terminal'] at 5" in out
    assert '-    "text": "a terminl"' in out and '+    "text": "a terminal"' in out
    assert "expected 1 input event(s) dropped, 0 were" in out
    assert out.splitlines()[-1] == "2 passed, 1 failed, 0 errors (1 file)"
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    assert [c.get("name") for c in suite.iter("testcase")] == ["passes", "wrong expectations", "only the rules stage"]


def test_invalid_test_or_config_is_an_error_with_position(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(CONFIG.replace("keywords:", "keyword:"))
    (tmp_path / "p.test.yaml").write_text(CASES.replace("expect: {no_alerts", "expct: {no_alerts"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2
    assert f"{tmp_path}/p.test.yaml:19:5: cases[2].expct: unknown key (did you mean 'expect'?" in res.stdout
    (tmp_path / "q.test.yaml").write_text(CASES)
    (tmp_path / "events.jsonl").write_text("{}\n")
    res = run(str(tmp_path / "q.test.yaml"))
    assert res.returncode == 2 and "rules[0].keyword: unknown key (did you mean 'keywords'?" in res.stdout


def test_results_do_not_depend_on_the_wall_clock(tmp_path: Path) -> None:
    first = run("config/").stdout
    assert run("config/").stdout == first


def test_an_unwritable_junit_path_is_one_line(tmp_path: Path) -> None:
    res = run("config/", "--junit", str(tmp_path))  # a directory
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr == f"pipeline: --junit: {tmp_path}: cannot write: Is a directory\n"


def test_a_pipeline_config_given_as_a_test_file_says_so(tmp_path: Path) -> None:
    """`pipeline test config/meeting.yaml` used to complain about VIDEO_DB_API_KEY instead."""
    res = run("config/meeting.yaml")
    assert res.returncode == 2, res.stdout
    assert ("config/meeting.yaml: a pipeline config, not a test file: tests go in a *.test.yaml file that names it "
            "(`config: meeting.yaml`), such as config/meeting.test.yaml") in res.stdout
    assert "VIDEO_DB_API_KEY" not in res.stdout
    (tmp_path / "t.test.yaml").write_text(CASES.replace("config: p.yaml", "config: ${CFG}"))
    res = run(str(tmp_path / "t.test.yaml"))
    assert res.returncode == 2 and "t.test.yaml:1:9: environment variable CFG is not set" in res.stdout, res.stdout


def test_a_case_that_expects_nothing_is_an_error(tmp_path: Path) -> None:
    """`expect: {}` (or `alerts: []`) used to pass whatever the rules did: a test that cannot fail."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    case = "  - {{name: {}, input: [{{channel: visual_index, data: {{text: a terminal}}}}], expect: {}}}\n"
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n" + case.format("empty", "{}")
                                          + case.format("no-list", "{alerts: []}")
                                          + case.format("both", "{no_alerts: true, alerts: [{label: term}]}")
                                          + case.format("fine", "{dropped: 0}"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout
    lines = res.stdout.splitlines()
    assert "cases[0].expect: expects nothing, so the case would pass whatever happens" in lines[1]
    assert "cases[1].expect: expects nothing" in lines[2]
    assert "cases[2].expect: no_alerts: true and alerts: [...] contradict each other" in lines[3]
    assert len(lines) == 5, lines


def test_an_alert_label_no_rule_has_is_an_error(tmp_path: Path) -> None:
    """With `count: 0`, a misspelled rule name used to pass whatever the rules did."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text(
        "config: p.yaml\ncases:\n"
        "  - {name: typo, input: [{channel: visual_index, data: {text: a terminal}}],"
        " expect: {alerts: [{label: trem, count: 0}]}}\n"
        "  - {name: right, input: [{channel: visual_index, data: {text: a terminal}}],"
        " expect: {alerts: [{label: term, count: 1}]}}\n")
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout
    assert (f"{tmp_path}/p.test.yaml:3:5: expect.alerts[0].label: no rule named 'trem' runs in this case "
            "(did you mean 'term'?)") in res.stdout
    assert f"ok    {tmp_path}/p.test.yaml: right" in res.stdout


def test_a_test_file_that_is_not_utf8_is_an_error_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "a.test.yaml").write_bytes(CASES.replace("- name: passes", "- name: pa\xdfes").encode("latin-1"))
    (tmp_path / "b.test.yaml").write_text(CASES.split("  - name: wrong")[0])
    res = run(str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{tmp_path}/a.test.yaml:3: not UTF-8 text (byte 0xdf)" in res.stdout, res.stdout
    assert f"ok    {tmp_path}/b.test.yaml: passes" in res.stdout  # the other file still runs


def test_a_case_that_passes_whatever_the_rules_do_is_an_error(tmp_path: Path) -> None:
    """`dropped: []` checks nothing, and with no input events (`input: []`, an empty `input_file`) every
    expectation that can pass passes whatever the rules do: each such case passed, a test that cannot fail."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "empty.jsonl").write_text("\n")
    case = "  - {{name: {}, {}, expect: {}}}\n"
    one = "input: [{channel: visual_index, data: {text: a terminal}}]"
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n"
                                          + case.format("empty-dropped", one, "{dropped: []}")
                                          + case.format("no-input", "input: []", "{no_alerts: true}")
                                          + case.format("empty-file", "input_file: empty.jsonl", "{dropped: 0}"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout
    lines = res.stdout.splitlines()
    assert "cases[0].expect: expects nothing, so the case would pass whatever happens" in lines[1], lines
    assert "p.test.yaml:4:22: cases[1].input: no events: without input" in lines[2], lines
    assert len(lines) == 4, lines
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n"
                                          + case.format("empty-file", "input_file: empty.jsonl", "{dropped: 0}"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout
    assert "p.test.yaml:3:24: cases[0].input_file: no events in empty.jsonl" in res.stdout, res.stdout


def test_a_count_0_expectation_that_names_nothing_that_runs_is_an_error(tmp_path: Path) -> None:
    """`count: 0` with a misspelled rtstream, keyword or severity passed whatever the rules did (no alert could
    ever match it), as a misspelled label did before it was checked."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    case = ("  - {{name: {}, input: [{{channel: visual_index, rtstream_id: s1, data: {{text: a terminal}}}}],"
            " expect: {{alerts: [{{label: term, {}, count: 0}}]}}}}\n")
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n" + case.format("stream", "rtstream: s2")
                                          + case.format("keyword", "matched: [terminl]")
                                          + case.format("severity", "severity: critcal"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout
    where = f"{tmp_path}/p.test.yaml"
    assert (f"{where}:3:5: expect.alerts[0].rtstream: no input event is on rtstream 's2'; expected one of: s1"
            ) in res.stdout, res.stdout
    assert (f"{where}:4:5: expect.alerts[0].matched: no rule running in this case has the keyword 'terminl' "
            "(did you mean 'terminal'?)") in res.stdout, res.stdout
    assert (f"{where}:5:5: expect.alerts[0].severity: no rule running in this case has severity 'critcal'; "
            "expected one of: info") in res.stdout, res.stdout


def test_the_closest_event_is_the_one_a_typo_was_meant_for(tmp_path: Path) -> None:
    """An `events_out` pattern with a typo in a text ("more codes") was shown next to the first event out, since
    every unequal text scored the same; the README shows it next to "more code", the event it was meant for."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text("""config: p.yaml
cases:
  - name: typo
    input:
      - {channel: visual_index, rtstream_id: s1, at: 0s, data: {text: "VS Code with a terminal"}}
      - {channel: visual_index, rtstream_id: s1, at: 60s, data: {text: "more code"}}
      - {channel: visual_index, rtstream_id: s1, at: 90s, data: {text: "a browser"}}
    expect:
      events_out: [{channel: visual_index, data: {text: "more codes"}}]
""")
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert '-    "text": "more codes"\n          +    "text": "more code"\n' in res.stdout, res.stdout


def test_the_readme_example_case_passes(tmp_path: Path) -> None:
    """The README's annotated `*.test.yaml` example, run as written against config/meeting.yaml (it failed: its
    third event matched 'stack trace', not the 'code' the expectation named)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml\n# config/meeting.test.yaml\n") + len("```yaml\n")
    (tmp_path / "meeting.test.yaml").write_text(readme[start:readme.index("```", start)])
    (tmp_path / "meeting.yaml").write_text((ROOT / "config/meeting.yaml").read_text())
    res = run(str(tmp_path / "meeting.test.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "1 passed, 0 failed, 0 errors (1 file)"


def test_control_characters_from_a_test_file_are_shown_not_sent_to_the_terminal(tmp_path: Path) -> None:
    """A case name and an rtstream id holding ESC sequences, a CR and a newline: printed raw they retitled and
    cleared the terminal and forged an `ok` line, and the JUnit XML could not be parsed. Now each is shown as
    `\\xNN`: one line per case, and readable XML."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text("""config: p.yaml
cases:
  - name: "evil \\e]0;pwned\\a\\e[2J\\r\\nok    forged: passes"
    input:
      - {channel: visual_index, rtstream_id: "s\\e]0;T\\a", data: {text: "a terminal"}}
    expect: {alerts: [{label: term, count: 2}]}
""")
    res = run(str(tmp_path), "--junit", str(tmp_path / "j.xml"), cwd=tmp_path.parent)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "\x1b" not in res.stdout and "\r" not in res.stdout and "\x07" not in res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == f"FAIL  {tmp_path}/p.test.yaml: evil \\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0aok    forged: passes"
    assert not any(line.startswith("ok ") for line in lines), lines
    assert "term [info] on s\\x1b]0;T\\x07 matched ['terminal'] at 0" in res.stdout
    case = next(ET.parse(tmp_path / "j.xml").getroot().iter("testcase"))
    assert case.get("name", "").startswith("evil \\x1b]0;pwned")


def test_a_named_pipe_found_in_a_directory_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A FIFO named `*.test.yaml` under a searched directory: its read waited for a writer for ever."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    os.mkfifo(tmp_path / "x.test.yaml")
    res = run(str(tmp_path), cwd=tmp_path.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr == f"pipeline: {tmp_path}/x.test.yaml: a named pipe, not a test file: not read when found in " \
                         "a directory (name it to read from a pipe)\n"


def test_an_input_file_of_more_events_than_a_rule_test_needs_is_an_error(tmp_path: Path) -> None:
    """Within the 64 MiB an input_file may have, tiny lines (`{}`) were 20 million events: 5.7 GB of memory and a
    minute. Now more than MAX_INPUT_EVENTS is an error, read one line at a time."""
    from pipeline.testing.model import MAX_INPUT_EVENTS

    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "events.jsonl").write_text("{}\n\n" * (MAX_INPUT_EVENTS + 1))
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n  - name: many\n    input_file: events.jsonl\n"
                                          "    expect: {no_alerts: true}\n")
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"p.test.yaml:4:5: input_file: more than {MAX_INPUT_EVENTS:,} events in {tmp_path}/events.jsonl" \
           in res.stdout, res.stdout


def test_an_input_event_nested_too_deeply_is_an_error_with_its_line(tmp_path: Path) -> None:
    """A JSON line nested 600 levels deep (JSON allows 1,024): copying it for the case raised RecursionError, shown
    as a failed case that said nothing of the file. Now it is refused with its line, at the depth YAML allows."""
    from pipeline.yamlpos import MAX_DEPTH

    deep = '{"a": ' * 600 + "{}" + "}" * 600
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "events.jsonl").write_text('{"channel": "visual_index"}\n' + deep + "\n")
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n  - name: deep\n    input_file: events.jsonl\n"
                                          "    expect: {no_alerts: true}\n")
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{tmp_path}/events.jsonl:2: nested more than {MAX_DEPTH} levels deep" in res.stdout, res.stdout


def test_the_junit_report_is_private_in_private_directories(tmp_path: Path) -> None:
    """Guarantees, Security: files we create are 0600, directories 0700 (the report holds the cases' event
    text). It was written 0644 into parents made 0755."""
    target = tmp_path / "new" / "sub" / "junit.xml"
    res = run("config/", "--junit", str(target))
    assert res.returncode == 0, res.stderr
    assert int(ET.parse(target).getroot().get("tests", "0")) > 0
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert [oct(d.stat().st_mode & 0o777) for d in (target.parent, target.parent.parent)] == [oct(0o700)] * 2


def test_a_bad_at_is_an_error_at_its_own_line(tmp_path: Path) -> None:
    """An input event's `at:` that is no duration was reported at its case's line (`p.test.yaml:3:5: at: ...`),
    for an input_file too: one bad line among 100,000 events had to be searched for by hand. Now the error names
    the event's own `at` (inline: its line and key path; input_file: the file and its line)."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "events.jsonl").write_text('{"channel": "visual_index", "at": "1s"}\n'
                                           '{"channel": "visual_index", "at": "soon"}\n')
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n  - name: inline\n    input:\n"
                                          "      - {channel: visual_index, at: 1s}\n"
                                          "      - channel: visual_index\n        at: 5q\n"
                                          "    expect: {no_alerts: true}\n")
    (tmp_path / "q.test.yaml").write_text("config: p.yaml\ncases:\n  - name: file\n    input_file: events.jsonl\n"
                                          "    expect: {no_alerts: true}\n")
    res = run(str(tmp_path / "p.test.yaml"), str(tmp_path / "q.test.yaml"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert f"      {tmp_path}/p.test.yaml:7:9: cases[0].input[1].at: expected a duration like 30s, got '5q'" in lines, \
        lines
    assert f"      {tmp_path}/events.jsonl:2: at: expected a duration like 30s, got 'soon'" in lines, lines


def test_the_junit_report_parses_whatever_the_case_names_and_texts_hold(tmp_path: Path) -> None:
    """XML 1.0 cannot hold U+FFFE or U+FFFF, even escaped: a case named "\\uFFFE" (a YAML escape), or a failing
    case whose event text holds U+FFFF (valid JSON), made a report that no CI system could parse. They are now
    written as `\\ufffe`, as control characters are as `\\xNN`."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "events.jsonl").write_text('{"channel": "visual_index", "data": {"text": "a terminal \\uffff"}}\n')
    (tmp_path / "p.test.yaml").write_text('config: p.yaml\ncases:\n  - name: "odd \\uFFFE name"\n'
                                          "    input_file: events.jsonl\n"
                                          '    expect: {events_out: [{data: {text: "a terminal"}}]}\n')
    res = run(str(tmp_path / "p.test.yaml"), "--junit", str(tmp_path / "junit.xml"))
    assert res.returncode == 1, res.stdout + res.stderr
    case = next(ET.parse(tmp_path / "junit.xml").getroot().iter("testcase"))
    assert case.get("name") == "odd \\ufffe name"
    failure = case.find("failure")
    assert failure is not None and '"text": "a terminal \\uffff"' in (failure.text or ""), failure
