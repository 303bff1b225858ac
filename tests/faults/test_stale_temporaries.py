"""Temporary files a `kill -9` left mid-write are removed at the next start, and only those provably stale.

Real processes killed with SIGKILL at the worst moment (a state file half written, a parquet file open), real
`pipeline run` subprocesses, real files, symlinks and live processes that must be left alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.stale import hold_dir, remove_stale
from pipeline.state import prepare, release
from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.faults.test_faust_attacks import gated_config
from tests.procs import ROOT, finish, pipeline_run
from tests.test_faust_runtime import Workers

pytestmark = pytest.mark.timeout(30)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HALF_WRITTEN = """
import os, sys, time
from pipeline import files
def stalled(fd, data):  # the disk takes part of it, then the process is killed before the rename
    os.write(fd, data[:10])
    print("mid-write", flush=True)
    time.sleep(60)
files._write_all = stalled
files.write_private_text(sys.argv[1], "12345678901234567890")
"""


def killed_mid_write(path: Path) -> Path:
    """Run a process that writes `path` atomically, SIGKILL it between the write and the rename: the leftover."""
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, str(path)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "mid-write\n"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = path.with_name(f".{path.name}.{proc.pid}.tmp")
    assert left.read_bytes() == b"1234567890" and not path.exists()
    return left


def test_a_state_file_left_half_written_by_kill_9_is_removed_when_the_state_dir_is_taken(tmp_path: Path) -> None:
    """Before: `.videodb_ws_id.<pid>.tmp` stayed in state_dir for ever, one more per crash."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    left = killed_mid_write(state / "videodb_ws_id")
    prepare(state)
    try:
        assert not left.exists()
        assert sorted(p.name for p in state.iterdir()) == ["lock"]
    finally:
        release(state)


def test_only_provably_stale_temporaries_are_removed(tmp_path: Path) -> None:
    """A live writer's file, a symlink, a name not ours and anything outside the directory stay; a file whose
    pid now belongs to a process started after the file last changed (a reused pid) goes."""
    d = tmp_path / "d"
    d.mkdir()
    dead = killed_mid_write(d / "a.json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine_now = d / f".b.json.{live.pid}.tmp"
        mine_now.write_bytes(b"being written")  # written after `live` started: may be its
        reused = d / f".c.json.{live.pid}.tmp"
        reused.write_bytes(b"old")
        os.utime(reused, (time.time() - 3600, time.time() - 3600))  # before `live` started: not its
        outside = tmp_path / "victim"
        outside.write_bytes(b"not ours to remove")
        link = d / f".e.json.{dead.name.split('.')[-2]}.tmp"
        link.symlink_to(outside)
        other = d / ".f.json.x.tmp"  # not a name we make
        other.write_bytes(b"")
        sub = d / "sub"
        sub.mkdir()
        below = sub / dead.name  # below the directory: not looked at
        below.write_bytes(b"")
        assert sorted(remove_stale(d)) == sorted([dead.name, reused.name])
        assert mine_now.exists() and link.is_symlink() and outside.exists() and other.exists() and below.exists()
        assert sorted(remove_stale(d)) == []
        assert remove_stale(link) == [] and outside.exists()  # a symlink given as the directory is not followed
    finally:
        live.kill()
        live.wait()


def parquet_config(tmp_path: Path, source: Path, name: str) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: {name}
source: {{type: replay, path: {source}}}
sinks: [{{type: parquet, path: {tmp_path}/pq, complete_on_flush: false, roll_interval: 1h, row_group_rows: 1}}]
dead_letter: {tmp_path}/{name}-dead.jsonl
state_dir: {tmp_path}/{name}-state
""")
    return cfg


def event(i: int) -> bytes:
    return orjson.dumps({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1_700_000_000 + i,
                         "data": {"text": f"line {i}", "start": 1_700_000_000_000 + i}}) + b"\n"


def open_parquet_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], int, Path]:
    """A `pipeline run` reading a named pipe, with a parquet file open (not complete); the process, the pipe's
    writer end, and the file being written."""
    os.mkfifo(tmp_path / f"{name}.pipe")
    proc = pipeline_run(parquet_config(tmp_path, tmp_path / f"{name}.pipe", name), cwd=tmp_path)
    writer = os.open(tmp_path / f"{name}.pipe", os.O_WRONLY)  # waits for the run to open it
    os.write(writer, event(0) + event(1))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not list((tmp_path / "pq").glob(f".part-*-{proc.pid}-*.parquet.tmp")):
        assert proc.poll() is None, finish(proc, 1)[1]
        time.sleep(0.02)
    found = list((tmp_path / "pq").glob(f".part-*-{proc.pid}-*.parquet.tmp"))
    assert len(found) == 1, sorted(p.name for p in (tmp_path / "pq").iterdir())
    return proc, writer, found[0]


def test_a_parquet_file_a_killed_run_was_writing_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """Before: the killed run's `.part-...parquet.tmp` (up to roll_bytes, 64 MiB by default) stayed for ever."""
    proc, writer, left = open_parquet_run(tmp_path, "killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    os.close(writer)
    assert left.exists()
    (tmp_path / "in.jsonl").write_bytes(event(2))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(parquet_config(tmp_path, tmp_path / "in.jsonl",
                                                                                           "next"))],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert not left.exists(), r.stderr
    names = sorted(p.name for p in (tmp_path / "pq").iterdir())
    assert len(names) == 1 and names[0].startswith("part-") and names[0].endswith(".parquet"), names
    assert "removed 1 temporary file(s) a killed run left behind" in r.stderr


def test_a_parquet_file_another_live_run_is_writing_is_left_alone(tmp_path: Path) -> None:
    """Another process writes the same directory (workers sharing a volume, where the pid in the name can be
    one reused here): its open file is locked, so it stays, even when its pid looks reused; it completes."""
    proc, writer, open_file = open_parquet_run(tmp_path, "live")
    try:
        os.utime(open_file, (time.time() - 3600, time.time() - 3600))  # older than its writer: the pid looks reused
        (tmp_path / "in.jsonl").write_bytes(event(2))
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run",
                            str(parquet_config(tmp_path, tmp_path / "in.jsonl", "other"))],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert open_file.exists(), r.stderr
    finally:
        os.close(writer)  # the live run's source ends: it completes its file
    _, err = finish(proc, 15)
    assert proc.returncode == 0, err
    assert (tmp_path / "pq" / open_file.name[1:-4]).exists()
    assert not list((tmp_path / "pq").glob(".*.tmp"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_single_files_left_half_written_go_when_written_again(tmp_path: Path) -> None:
    """`--summary-json`, a `pipeline report` page and `--junit`: a run killed as it wrote one left its temporary
    beside it for ever. Now the next run writing that file removes it (and only it, in a directory not ours)."""
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "capture_session_id": "cap-1", "rtstream_id": "r",
                      "unix_ts": 1_700_000_000 + i, "data": {"text": f"hi {i}", "start": 1_700_000_000_000 + i,
                                                            "is_final": True}}) + b"\n" for i in range(3)))
    (tmp_path / "p.yaml").write_text("name: s\nsource: {type: replay, path: in.jsonl}\n"
                                     "sinks: [{type: jsonl, path: out/o.jsonl}]\n")
    left = [killed_mid_write(tmp_path / name) for name in ("s.json", "report-cap-1.html", "j.xml")]
    bystander = tmp_path / f".other.json.{left[0].name.split('.')[-2]}.tmp"  # not a file this run writes
    bystander.write_bytes(b"")
    r = cli("run", "p.yaml", "--summary-json", "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("report", "in.jsonl", "-o", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("test", str(ROOT / "config"), "--junit", str(tmp_path / "j.xml"), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.exists() for p in left] == [False, False, False]
    assert all((tmp_path / n).exists() for n in ("s.json", "report-cap-1.html", "j.xml")) and bystander.exists()


def test_the_session_store_leaves_a_live_writers_temporary(tmp_path: Path) -> None:
    """Before: it removed every `.*.tmp` at start, also one another live process was writing (its rename then
    failed). Now only those whose writer is gone."""
    from stages.controller.session_store import SESSIONS_DIR, SessionStore

    store = SessionStore(tmp_path)
    store.dir.mkdir(parents=True)
    dead = killed_mid_write(tmp_path / SESSIONS_DIR / "cap-1.json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        writing = store.dir / f".cap-2.json.{live.pid}.tmp"
        writing.write_bytes(b"{")
        store.clean_temporaries()
        assert not dead.exists() and writing.exists()
    finally:
        live.kill()
        live.wait()


async def test_the_directory_of_a_worker_killed_with_sigkill_goes_when_the_next_worker_starts(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: `workers/<host>-<pid>/` (faust's data directory) was removed only by a clean stop, so each worker
    killed left one for ever. A live worker's directory (here: this test's own pid) stays, and so does one whose
    pid is not a process here but which a live worker holds (a container with its own pids on the same volume)."""
    cfg = gated_config(tmp_path, kafka_broker, f"stale{os.getpid()}", tmp_path / "out/lines.jsonl")
    workers = Workers(cfg, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)})
    host = socket.gethostname()
    alive = tmp_path / "workers" / f"{host}-{os.getpid()}"
    foreign = tmp_path / "workers" / f"{host}-{next(p for p in range(4_194_000, 4_194_304) if not _alive(p))}"
    held = -1
    try:
        first = workers.start()
        mine = tmp_path / "workers" / f"{host}-{first.pid}"
        assert await wait_until(lambda: mine.is_dir(), first)
        alive.mkdir()
        foreign.mkdir()
        held = hold_dir(foreign)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert mine.is_dir()
        second = workers.start()
        assert await wait_until(lambda: not mine.exists() and (tmp_path / "workers" / f"{host}-{second.pid}").is_dir(),
                                second)
        assert alive.is_dir() and foreign.is_dir()
    finally:
        workers.stop_all()
        if held >= 0:
            os.close(held)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


async def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check():
        assert proc.poll() is None, proc.returncode
        await asyncio.sleep(0.05)
    return check()
