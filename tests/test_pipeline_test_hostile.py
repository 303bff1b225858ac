"""`pipeline test` against test files and plugins that would make it pass without testing anything."""

from __future__ import annotations

from pathlib import Path

from tests.test_pipeline_test import CONFIG, run

EXITING = '''
import sys

from pipeline.api import Options, Processor


class Exiting(Processor):
    """A plugin processor that calls sys.exit(0) on its first batch (a script turned into a stage)."""

    name = "exiting"
    Options = Options

    def process(self, batch):
        sys.exit(0)
'''


def two_cases(tmp: Path, plugin: str, first: str) -> None:
    """p.yaml with `plugin` in front of the rules, and p.test.yaml: case `first` runs it, "rules only" does not."""
    (tmp / "p.yaml").write_text(CONFIG.replace("stages:\n", f'stages:\n  - {{type: "{plugin}"}}\n'))
    (tmp / "p.test.yaml").write_text(f"""config: p.yaml
cases:
  - name: {first}
    input: [{{channel: visual_index, data: {{text: a terminal}}}}]
    expect: {{alerts: [{{label: term, count: 1}}]}}
  - name: rules only
    stages: [rules]
    input: [{{channel: visual_index, data: {{text: a terminal}}}}]
    expect: {{alerts: [{{label: term, count: 1}}]}}
""")


def test_a_processor_that_calls_sys_exit_fails_its_case_not_the_whole_run_with_0(tmp_path: Path) -> None:
    """SystemExit(0) from a processor ended `pipeline test` with exit code 0, printing nothing and writing no
    JUnit report: CI saw every test pass. Now the case fails, and the other cases and files still run."""
    (tmp_path / "exiting.py").write_text(EXITING)
    two_cases(tmp_path, "exiting:Exiting", "exits")
    res = run(str(tmp_path / "p.test.yaml"), "--junit", str(tmp_path / "j.xml"), cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == [f"FAIL  {tmp_path}/p.test.yaml: exits",
                         "      expected 1 alert(s) (label='term'), got 0; fired: none",
                         "      1 event(s) dead-lettered meanwhile: SystemExit x1"], lines  # (as if it raised)
    assert lines[3:] == [f"ok    {tmp_path}/p.test.yaml: rules only", "1 passed, 1 failed, 0 errors (1 file)"]
    assert (tmp_path / "j.xml").exists()


def test_expecting_no_alert_where_no_rule_runs_is_an_error(tmp_path: Path) -> None:
    """`no_alerts: true`, `only_these_alerts: true` or a `count: 0` alert in a case whose `stages:` run no rule
    passed whatever the rules did (nothing there makes alerts), as a label no rule has did before it was an
    error. Now each is an error, with the case's position."""
    (tmp_path / "p.yaml").write_text(CONFIG)
    case = ("  - {{name: {}, stages: [{}], input: [{{channel: visual_index, data: {{text: a terminal}}}}],"
            " expect: {}}}\n")
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n"
                                          + case.format("none", "filter", "{no_alerts: true}")
                                          + case.format("only", "filter", "{only_these_alerts: true}")
                                          + case.format("zero", "filter", "{alerts: [{count: 0}], dropped: 0}")
                                          + case.format("fine", "rules", "{no_alerts: false, alerts: [{count: 1}]}")
                                          + case.format("rules", "rules", "{no_alerts: true}"))
    res = run(str(tmp_path / "p.test.yaml"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    why = "no rule runs in this case (stages: filter), so no alert can come and this passes whatever the rules do"
    assert lines[1] == f"      {tmp_path}/p.test.yaml:3:5: expect.no_alerts: {why}", lines
    assert lines[3] == f"      {tmp_path}/p.test.yaml:4:5: expect.only_these_alerts: {why}", lines
    assert lines[5] == f"      {tmp_path}/p.test.yaml:5:5: expect.alerts[0]: {why}", lines
    assert lines[6] == f"ok    {tmp_path}/p.test.yaml: fine", lines
    assert lines[7].startswith(f"FAIL  {tmp_path}/p.test.yaml: rules"), lines  # the rules stage runs: it can fail
    assert lines[-1] == "1 passed, 1 failed, 3 errors (1 file)", lines


def test_a_named_pipe_as_config_or_input_file_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A test file whose `config:` or `input_file:` is a named pipe: `pipeline test DIR` (and `make test`) waited
    for a writer for ever, as it did for a test file that is a pipe before that was refused."""
    import os

    (tmp_path / "p.yaml").write_text(CONFIG)
    os.mkfifo(tmp_path / "cfg.yaml")
    os.mkfifo(tmp_path / "events.jsonl")
    one = "[{channel: visual_index, data: {text: a terminal}}]"
    (tmp_path / "a.test.yaml").write_text(f"config: cfg.yaml\ncases: [{{name: c, input: {one}, "
                                          "expect: {no_alerts: true}}]\n")
    (tmp_path / "b.test.yaml").write_text("config: p.yaml\ncases:\n  - name: c\n    input_file: events.jsonl\n"
                                          "    expect: {no_alerts: true}\n")
    res = run(str(tmp_path), cwd=tmp_path)  # (run's timeout: 60 s)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[1] == (f"      {tmp_path}/a.test.yaml:1:1: config: {tmp_path}/cfg.yaml: a named pipe: a test reads "
                        "only regular files (a pipe waits for a writer and can be read once)"), lines
    assert lines[3] == (f"      {tmp_path}/b.test.yaml:4:5: cases[0].input_file: {tmp_path}/events.jsonl: a named "
                        "pipe: a test reads only regular files (a pipe waits for a writer and can be read once)"), lines


def _timed(*args: str, cwd: Path, limit: float) -> tuple[str, float]:
    """`pipeline test ARGS`: its stdout and how long it took (AssertionError past `limit` seconds)."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_pipeline_test import ROOT

    started = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "test", *args], cwd=cwd, capture_output=True,
                             text=True, timeout=limit, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pipeline test did not finish within {limit:g}s") from None
    return res.stdout, time.monotonic() - started


def test_dropped_over_a_large_input_file_takes_linear_time(tmp_path: Path) -> None:
    """`dropped:` looked for each input event among every event out: 5,000 events through a filter took 22 s,
    the 100,000 an input_file may hold hours. Now events out are indexed by channel, text and time."""
    import json

    (tmp_path / "p.yaml").write_text(CONFIG)
    n = 30_000
    (tmp_path / "events.jsonl").write_text("".join(
        json.dumps({"channel": "visual_index" if i % 3 else "audio_index", "unix_ts": 1_700_000_000 + i,
                    "data": {"text": f"line {i % 1000}"}}) + "\n" for i in range(n)))
    (tmp_path / "p.test.yaml").write_text("config: p.yaml\ncases:\n"
                                          "  - {name: right, stages: [filter], input_file: events.jsonl, "
                                          f"expect: {{dropped: {n // 3}}}}}\n"
                                          "  - {name: wrong, stages: [filter], input_file: events.jsonl, "
                                          "expect: {dropped: 0}}\n")
    out, took = _timed(str(tmp_path / "p.test.yaml"), cwd=tmp_path, limit=30)
    lines = out.splitlines()
    assert lines[0] == f"ok    {tmp_path}/p.test.yaml: right", out[:2000]
    assert lines[2] == f"      expected 0 input event(s) dropped, {n // 3} were", out[:2000]
    assert '"channel":"audio_index","unix_ts":1700000000' in lines[3], out[:2000]
    assert took < 10, took


def test_the_closest_event_of_a_failing_pattern_is_found_in_bounded_time(tmp_path: Path) -> None:
    """A failing `events_out` pattern was compared with every event out by difflib, about 15 ms each for texts
    of 500 characters: 3 typos against 2,000 such events took 90 s (100,000 events: over an hour). Now a cheap
    measure picks the few events difflib compares, and the event each typo was meant for (the last ones) is still
    the one shown."""
    import json

    (tmp_path / "p.yaml").write_text(CONFIG)
    text = ("lorem ipsum dolor sit amet " * 20)[:480]
    (tmp_path / "events.jsonl").write_text("".join(
        json.dumps({"channel": "visual_index", "data": {"text": f"{text} {i:05d}"}}) + "\n" for i in range(2000)))
    pats = ", ".join(f'{{channel: visual_index, data: {{text: "{text.replace("amet", "amat", 1)} {k:05d}"}}}}'
                     for k in (1997, 1998, 1999))
    (tmp_path / "p.test.yaml").write_text(f"config: p.yaml\ncases:\n  - name: typos\n    stages: [filter]\n"
                                          f"    input_file: events.jsonl\n    expect:\n      events_out: [{pats}]\n")
    out, took = _timed(str(tmp_path / "p.test.yaml"), cwd=tmp_path, limit=30)
    assert out.splitlines()[0] == f"FAIL  {tmp_path}/p.test.yaml: typos", out[:2000]
    for k in (1997, 1998, 1999):
        assert f'+    "text": "{text} {k:05d}"' in out, out[:3000]
    assert took < 15, took  # about 1 s; before: 90 s (a bound a loaded CI machine keeps)


HANGS = '''
import time

from pipeline.api import Options, Processor


class Hangs(Processor):
    """A plugin processor waiting on a call that never returns (a lookup service without a timeout)."""

    name = "hangs"
    Options = Options

    def process(self, batch):
        while True:
            time.sleep(0.05)
'''


def test_a_case_whose_processor_hangs_fails_after_the_time_limit(tmp_path: Path) -> None:
    """A plugin processor that never returned held `pipeline test` (and CI) for ever, with no line saying which
    case. Now a case gets `--timeout` seconds (60 by default), then fails; the other cases still run."""
    (tmp_path / "hangs.py").write_text(HANGS)
    two_cases(tmp_path, "hangs:Hangs", "hangs")
    out, took = _timed(str(tmp_path / "p.test.yaml"), "--timeout", "0.5", cwd=tmp_path, limit=20)
    lines = out.splitlines()
    assert lines == [f"FAIL  {tmp_path}/p.test.yaml: hangs",
                     "      did not finish within 0.5s (--timeout): a processor that never returns?",
                     f"ok    {tmp_path}/p.test.yaml: rules only", "1 passed, 1 failed, 0 errors (1 file)"], out
    assert took < 10, took
