"""A sink that cannot open its file at start says which sink it is, in one line, and the run exits non-zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.procs import finish, pipeline_run

CASES = {
    "symlink": ("jsonl", "link.jsonl"),  # a symlink the sink refuses to write through
    "parent is a file": ("jsonl", "in.jsonl/out.jsonl"),  # its directory cannot be made
    "a directory": ("jsonl", "a_dir"),
    "parquet, parent is a file": ("parquet", "in.jsonl/out.parquet"),
    "unwritable directory": ("jsonl", "locked/out.jsonl"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_sink_whose_file_cannot_be_opened_is_named_in_the_one_line_error(tmp_path: Path, case: str) -> None:
    """Before: `pipeline: /x/link.jsonl: refusing to write through a symlink`: with several sinks (and `{date}`
    paths) nothing said which one, nor which entry of `sinks:` to fix. Now it starts with `sinks[1]:jsonl:`."""
    kind, where = CASES[case]
    if case == "unwritable directory" and os.geteuid() == 0:
        pytest.skip("root writes into a directory without write permission")
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    (tmp_path / "elsewhere.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "locked").mkdir(mode=0o555)
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: named
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks:
  - {{type: jsonl, path: {tmp_path}/ok.jsonl}}
  - {{type: {kind}, path: {tmp_path}/{where}}}
dead_letter: {tmp_path}/dead.jsonl
""")
    proc = pipeline_run(p, cwd=tmp_path)
    _, err = finish(proc, 30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"pipeline: sinks[1]:{kind}: {tmp_path}/"), err
    assert not (tmp_path / "elsewhere.jsonl").read_text()  # nothing went through the link
