"""The exit summary as JSON (`pipeline run --summary-json PATH`): the same counters as the text summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from pipeline import secrets
from pipeline.errors import ConfigError, StageError
from pipeline.files import check_writable, write_private_text
from pipeline.stale import remove_stale


def summary_dict(rt: Any) -> dict[str, Any]:
    b = rt.b
    stages: list[dict[str, Any]] = []
    sinks: list[dict[str, Any]] = []
    reports = {slot.stats.name: slot.report() for slot in b.sinks}
    procs = {p.context.stats.name: p for p in b.chain.processors}
    for st in b.stats:
        if st.kind == "source":
            stages.append({"name": st.name, "kind": "source", "read": st.received, "rejected": st.dropped})
        elif st.kind == "processor":
            stages.append({"name": st.name, "kind": "processor", "in": st.received, "out": st.sent,
                           "dropped": max(0, st.received - st.sent), "errors": st.errors,
                           **{k.replace("-", "_"): v for k, v in st.report_of(procs[st.name]).items()}})
        elif st.kind == "sink":
            report = dict(reports.get(st.name, {}))
            written = report.pop("written", st.sent)  # a sink may count what it really wrote (console)
            buffered = rt.buffer_counts(st.name) if hasattr(rt, "buffer_counts") else {}
            sinks.append({"name": st.name, "written": written, "failed": st.errors,
                          **{k.replace("-", "_"): v for k, v in report.items()},
                          **{_key(k): v for k, v in buffered.items()}})
    out: dict[str, Any] = {
        "pipeline": b.config.name, "seconds": round(time.monotonic() - rt.started, 3),
        "exit_code": rt.exit_code, "error": secrets.mask(str(rt.error)) if rt.error is not None else None,
        "stages": stages, "sinks": sinks, "alerts_fired": b.chain.alerts_fired,
        "dead_lettered": b.dead_letter.count,
        "dead_letter_path": str(b.dead_letter.path) if b.dead_letter.count else None,
        "lost": b.dead_letter.lost,  # events neither written nor dead-lettered (the text summary's LOST N)
        "lost_reason": secrets.mask(b.dead_letter.failure) if b.dead_letter.lost and b.dead_letter.failure else None,
        "dead_letter_full": b.dead_letter.full,  # rejects not written: the file had reached its bound
        "dead_letter_full_by_reason": dict(b.dead_letter.full_by_reason),
        "dead_letter_full_reason": b.dead_letter.full_reason if b.dead_letter.full else None,
        "ended": b.session.exit_reason or None,
    }
    gaps = getattr(b.session, "gaps", None)
    if gaps is not None:
        out["reconnects"] = gaps.reconnects
        out["gap_seconds"] = round(float(gaps.gap_seconds), 3)
        out["backfilled"] = dict(gaps.backfilled)
    return out


def _key(words: str) -> str:
    """A text summary label as a JSON key: `LOST with its spool` -> `lost_with_spool`."""
    return words.lower().replace("with its ", "with_").replace("-", "_").replace(" ", "_")


def check_summary_path(path: str) -> None:
    """Refuse a --summary-json path that cannot be written before the run, not after a whole meeting."""
    from pipeline.validate import creatable

    target = Path(path)
    why = f"{target} is a directory" if target.is_dir() else creatable(target)
    if why:
        raise ConfigError(f"--summary-json: cannot write {path}: {why}")
    try:  # what write_summary will refuse after the run (a symlink in the path), refused before it
        check_writable(target)
    except StageError as exc:
        raise ConfigError(f"--summary-json: {exc}") from None


def write_summary(rt: Any, path: str) -> None:
    """Write atomically (a reader never sees half a file)."""
    remove_stale(Path(path).parent, names={Path(path).name})  # left by a run killed as it wrote its summary
    try:  # 0600 in 0700 directories, as every file the pipeline writes
        write_private_text(path, orjson.dumps(summary_dict(rt), option=orjson.OPT_INDENT_2).decode() + "\n")
    except StageError as exc:
        raise ConfigError(f"--summary-json: {exc}") from None
