"""A sink re-created by a reload continues the run's output: what its predecessor wrote stays.

A jsonl sink with `clear: true` empties its file at its first write, so that a run starts afresh: its successor
after a reload (any change to the sink's options: `flush_interval`, `channels`, ...) emptied the file again and
everything written before the reload was lost, while the summary counted it as written.

Real parts: `pipeline run` in a subprocess, SIGHUP, SIGTERM, the summary on stderr.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import pipeline_run, stop_process


def run(tmp_path: Path, sink: Callable[[int], str], done: Callable[[], int], reloads: int = 1) -> str:
    """`pipeline run` of ticks into `sink(0)`; each reload i switches to `sink(i)` once `done()` grew by 10.
    Returns stderr after a SIGTERM."""
    p = tmp_path / "p.yaml"

    def write(i: int) -> None:
        p.write_text(f"""name: c
source: {{type: "tests.slow_sink:TickSource", every: 0.005}}
sinks: [{sink(i)}]
""")

    write(0)
    log = tmp_path / "err.log"
    with log.open("w") as err:
        proc = pipeline_run(p, cwd=tmp_path, stderr=err)
    try:
        deadline = time.monotonic() + 20
        for i in range(1, reloads + 2):
            before = done()
            while done() < before + 10:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
            if i <= reloads:
                write(i)
                proc.send_signal(signal.SIGHUP)
                while log.read_text().count("reload (SIGHUP)") < i:
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.01)
    finally:
        code = stop_process(proc)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    return text


def read(text: str) -> int:
    return int(next(ln.split() for ln in text.splitlines() if ln.startswith("  source:"))[2])


def test_a_jsonl_sink_with_clear_keeps_what_it_wrote_before_a_reload(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    (out).write_text('{"from": "the previous run"}\n')  # this one `clear` empties

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    text = run(tmp_path, lambda i: f"{{type: jsonl, path: {out}, clear: true, flush_interval: {i / 100}}}",
               lambda: lines() if b"previous" not in out.read_bytes() else 0, reloads=2)
    assert lines() == read(text), text  # every event read, once: none emptied away by a successor
    assert b"previous" not in out.read_bytes()
    assert text.count("reload (SIGHUP) applied") == 2, text


def test_a_jsonl_sink_with_clear_whose_new_options_do_not_start_keeps_what_it_wrote(tmp_path: Path) -> None:
    """The new path cannot be opened: the previous options start again, and emptied the file again too."""
    out = tmp_path / "o.jsonl"

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    text = run(tmp_path, lambda i: f"{{type: jsonl, path: {out}{'/under-a-file.jsonl' if i else ''}, clear: true}}",
               lines)
    assert "reload (SIGHUP) rejected for sinks[0]:jsonl" in text, text
    assert lines() == read(text), text


def test_parquet_files_of_sinks_re_created_within_a_second_do_not_replace_each_other(tmp_path: Path) -> None:
    """Each parquet sink numbered its files from 1 (`part-<second>-<pid>-00001.parquet`): the successor a reload
    made within the same second completed its first file under its predecessor's name, and the rename replaced
    it (every event in it lost, counted as written)."""
    import pyarrow.parquet as pq

    progress = tmp_path / "all.jsonl"

    def lines() -> int:
        return progress.read_bytes().count(b"\n") if progress.exists() else 0

    text = run(tmp_path, lambda i: f"{{type: jsonl, path: {progress}, flush_interval: 0}}, "
                                   f"{{type: parquet, path: {tmp_path}/pq, roll_interval: {i + 1}m}}",
               lines, reloads=5)
    files = sorted((tmp_path / "pq").glob("part-*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == read(text) == lines(), (files, text)
    assert text.count("reload (SIGHUP) applied") == 5, text


def test_the_summary_counts_what_the_sinks_a_reload_replaced_did(tmp_path: Path) -> None:
    """A sink's own counters (console `written`, parquet `files`, forwarder and kafka `delivered`) started from 0
    in its successor: after a reload the summary (and /metrics) said the console printed only what came after."""
    progress = tmp_path / "all.jsonl"

    def lines() -> int:
        return progress.read_bytes().count(b"\n") if progress.exists() else 0

    text = run(tmp_path, lambda i: f"{{type: jsonl, path: {progress}, flush_interval: 0}}, "
                                   f"{{type: console, max_text: {100 + i}}}, "
                                   f"{{type: parquet, path: {tmp_path}/pq, roll_interval: {i + 1}m}}",
               lines, reloads=2)
    console = next(ln.split() for ln in text.splitlines() if ln.startswith("  sinks[1]:console"))
    parquet = next(ln.split() for ln in text.splitlines() if ln.startswith("  sinks[2]:parquet"))
    assert int(console[2]) == read(text) == lines(), text
    assert parquet[3:] == ["files", str(len(list((tmp_path / "pq").glob("part-*.parquet"))))] == ["files", "3"], text
