"""A regex rule's keywords are checked as the stage runs them: as one RE2 alternation.

Each keyword compiled alone, so a rule of 100 keywords like `k7[a-zA-Z0-9]{1000}` validated
(`pipeline validate` said ok), then the stage failed when it was built: `pipeline run` exited 1
with `cannot start`, `pipeline test` called it a failing case (exit 1), a reload was rejected
with the whole alternation quoted. Now it is a config error: exit 2, one line with file:line.

Real parts: the `pipeline` CLI in a subprocess on real files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT

KEYWORDS = ", ".join(f'"k{i}[a-zA-Z0-9]{{1000}}"' for i in range(100))  # each fine alone, too large together


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_regex_rule_too_large_as_a_whole_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ev.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    (tmp_path / "p.yaml").write_text(f"""name: rx
source: {{type: replay, path: ev.jsonl}}
stages:
  - type: rules
    rules:
      - {{name: fine, match: regex, keywords: ["k[a-z]+"]}}
      - {{name: huge, match: regex, keywords: [{KEYWORDS}]}}
sinks: [{{type: console}}]
""")
    (tmp_path / "p.test.yaml").write_text("""config: p.yaml
cases:
  - name: quiet
    input: [{channel: transcript, data: {text: hi}}]
    expect: {no_alerts: true}
""")
    want = ("p.yaml:7:9: stages[0].rules[1]: its 100 regex keywords together are not supported: pattern too large - "
            "compile failed (a rule's regexes run as one RE2 alternation; split them over several rules)")
    res = _cli("validate", "p.yaml", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.splitlines() == [f"pipeline: {want}"], res.stderr
    res = _cli("test", "p.test.yaml", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"      {want}" in res.stdout.splitlines(), res.stdout


def test_a_regex_rule_on_several_channels_is_compiled_once_per_stage(make_context) -> None:  # type: ignore[no-untyped-def]
    """Building the stage compiled each regex rule once per channel it watches (three by default), and each of its
    keywords again though the config had just compiled them: 2,000 rules of 5 regexes held the event loop for
    1.6 s at a reload (a `pipeline run` with --http polled every 5 ms: /api/status did not answer meanwhile).
    Now the stage compiles each rule's alternation once; it still matches on every channel."""
    from unittest import mock

    import re2

    from stages.processors.rules import Rules, RulesOptions

    opts = RulesOptions.model_validate({"rules": [
        {"name": f"r{i}", "match": "regex", "keywords": [f"w{i}x[0-9]+", f"v{i}y[a-z]+"]} for i in range(50)]})
    with mock.patch.object(re2, "compile", wraps=re2.compile) as compiled:
        stage = Rules(opts, make_context())
    assert compiled.call_count == 50, compiled.call_count  # one alternation per rule, none per channel or keyword
    out = stage.process([{"channel": ch, "rtstream_id": ch, "data": {"text": "see w7x12 and v9yes", "start": 1}}
                         for ch in ("transcript", "visual_index", "audio_index")])
    fired = [(e["rtstream_id"], e["data"]["event_label"], e["data"]["matched"]) for e in out if e["channel"] == "alert"]
    assert fired == [(ch, rule, [hit]) for ch in ("transcript", "visual_index", "audio_index")
                     for rule, hit in (("r7", "w7x12"), ("r9", "v9yes"))], fired
