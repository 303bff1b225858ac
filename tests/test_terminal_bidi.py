"""Bidirectional overrides and isolates in event text reach the terminal as text, not as reordering.

The console sink (and every other terminal output, through the same function) showed C0/C1 controls as `\\xNN`
but printed U+202E (RIGHT-TO-LEFT OVERRIDE) and its kin raw: on a terminal that applies the bidi algorithm the
rest of the line showed reversed, so a transcript `wire to <U+202E>1234` read `wire to 4321`, and an alert's
`(matched: ...)` tail was reversed with it. They are now shown as `\\u202e`.

Real parts: `pipeline run` of a replay in a subprocess, its stdout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.procs import finish, pipeline_run


def test_a_bidi_override_in_event_text_is_shown_not_applied(tmp_path: Path) -> None:
    text = "wire to \u202e1234 now \u2067\u2069 ok"
    (tmp_path / "in.jsonl").write_text(json.dumps({"channel": "transcript", "rtstream_id": "r1",
                                                   "data": {"text": text}}) + "\n")
    (tmp_path / "p.yaml").write_text("""name: bidi
source: {type: replay, path: in.jsonl}
stages: [{type: rules, rules: [{name: wire, keywords: [wire]}]}]
sinks: [{type: console}]
""")
    proc = pipeline_run(tmp_path / "p.yaml", cwd=tmp_path, stdout=subprocess.PIPE)
    out, err = finish(proc, 30)
    assert proc.returncode == 0, err
    assert all(c not in out for c in "\u202e\u2067\u2069"), repr(out)
    shown = "wire to \\u202e1234 now \\u2067\\u2069 ok"
    assert f"[transcript r1] {shown}\n" in out and f"[ALERT info wire r1] {shown} (matched: wire)\n" in out, out
