"""A replay source reading a named pipe that a live writer fills (`tail -f videodb_events.jsonl > pipe`).

Before: the source read `batch_size` lines in one blocking call, so an event written to the pipe was passed
on only once 256 lines had come or the writer closed its end, and meanwhile the whole pipeline was stopped:
SIGTERM took effect only when the writer closed (17 s in the case tried by hand). With no writer yet, opening
the pipe blocked the same way. Now the pipe is read when it is readable, without blocking the event loop.

Real parts: `pipeline run` in a subprocess, a named pipe, a writer holding it open, SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import finish, pipeline_run

EVENT = b'{"channel": "transcript", "rtstream_id": "r", "unix_ts": 1, "data": {"text": "hello"}}\n'


def config(tmp_path: Path, speed: float) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(f"""name: pipe
source: {{type: replay, path: {tmp_path}/in.pipe, speed: {speed}}}
sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl, flush_interval: 0}}]
""")
    os.mkfifo(tmp_path / "in.pipe")
    return p


def written(tmp_path: Path) -> int:
    out = tmp_path / "o.jsonl"
    return out.read_bytes().count(b"\n") if out.exists() else 0


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_events_written_to_a_pipe_go_through_at_once_and_sigterm_does_not_wait_for_the_writer(
        tmp_path: Path) -> None:
    for speed in (0, 1000):
        run = tmp_path / f"speed{speed}"
        run.mkdir()
        proc = pipeline_run(config(run, speed), cwd=run)
        writer = os.open(run / "in.pipe", os.O_WRONLY)  # waits for the pipeline to open it
        try:
            os.write(writer, EVENT * 3)
            assert wait_for(lambda run=run: written(run) == 3, 10), f"speed {speed}: {written(run)} of 3 written"
            os.write(writer, EVENT)  # the writer stays, as a live one does
            assert wait_for(lambda run=run: written(run) == 4, 10)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            _, err = finish(proc, 10)
            took = time.monotonic() - started
        finally:
            os.close(writer)
        assert proc.returncode == 0 and took < 3, (took, err)
        assert "read         4" in err and "written      4" in err, err


def test_sigterm_stops_a_run_whose_pipe_no_writer_ever_opened(tmp_path: Path) -> None:
    proc = pipeline_run(config(tmp_path, 0), cwd=tmp_path)
    time.sleep(1.5)  # started, waiting for a writer
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = finish(proc, 10)
    assert proc.returncode == 0 and time.monotonic() - started < 3, err
    assert "read         0" in err, err


def test_the_writer_closing_the_pipe_ends_the_replay_like_the_end_of_a_file(tmp_path: Path) -> None:
    proc = pipeline_run(config(tmp_path, 0), cwd=tmp_path)
    with (tmp_path / "in.pipe").open("wb") as fh:
        fh.write(EVENT * 500 + EVENT.rstrip(b"\n"))  # the last line without its newline, as a file's may end
    _, err = finish(proc, 20)
    assert proc.returncode == 0, err
    assert written(tmp_path) == 501
