"""Collect the inputs, render each session, write the pages (0600, atomically)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.files import write_private_text
from pipeline.report.collect import MAX_SESSIONS, Collector, input_files
from pipeline.report.render import render
from pipeline.stale import remove_stale

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(session_id: str) -> str:
    """A file-name part from a session id that came off the wire (never a path, never hidden)."""
    return _UNSAFE.sub("_", session_id).strip("._")[:80] or "session"


def output_paths(ids: list[str], inputs: list[str], out: str | None) -> dict[str, Path]:
    """`-o x.html`: that file (one session) or `x-<session>.html` each; `-o DIR` or none: `report-<session>.html`."""
    if out is not None and out.endswith(".html"):
        target = Path(out)
        if len(ids) == 1:
            return {ids[0]: target}
        folder, stem = target.parent, target.stem
    else:
        stem = "report"
        if out is not None:
            folder = Path(out)
        elif len(inputs) == 1 and Path(inputs[0]).is_dir():
            folder = Path(inputs[0])
        else:
            folder = Path(".")
    paths: dict[str, Path] = {}
    for sid in ids:
        p = folder / f"{stem}-{safe_name(sid)}.html"
        n = 2
        while p in paths.values():  # two ids that differ only in unsafe characters
            p = folder / f"{stem}-{safe_name(sid)}-{n}.html"
            n += 1
        paths[sid] = p
    return paths


def build_reports(inputs: list[str], out: str | None = None, gap_ms: int = 30_000) -> list[Path]:
    """Write one HTML page per capture session found in `inputs`; returns the paths written."""
    files = input_files(inputs)
    if not files:
        raise ConfigError(f"{', '.join(inputs)}: no .jsonl files to read")
    collected = Collector().read(files)
    sessions = {sid: s for sid, s in collected.sessions.items() if s.t_min is not None}
    if not sessions:
        raise ConfigError(f"{', '.join(inputs)}: no capture-session events found in {len(files)} file(s)")
    paths = output_paths(sorted(sessions), inputs, out)
    for folder in {p.parent for p in paths.values()}:  # what a killed earlier report left of these pages
        remove_stale(folder, names={p.name for p in paths.values() if p.parent == folder})
    for sid, path in paths.items():
        write_private_text(path, render(sessions[sid], collected, gap_ms))
    if collected.left_out:  # never silently: say what the session cap left out, and what to do
        print(f"pipeline report: {collected.left_out} event(s) of sessions past the first {MAX_SESSIONS} were "
              "left out; report fewer files at a time", file=sys.stderr)
    return list(paths.values())
