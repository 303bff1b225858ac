"""The dead-letter file's bound (`dead_letter_max_bytes`): real files; a reject that does not fit is counted,
not written, and the caller goes on."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from pipeline import deadletter
from pipeline.deadletter import DeadLetter


class Clock:
    """A settable clock for pipeline.deadletter: fixed line lengths (`ts`), and minutes that pass at once."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.125

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(deadletter, "time", SimpleNamespace(time=c.time, monotonic=c.monotonic))
    return c


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-80:]
    return [orjson.loads(x) for x in data.splitlines()]


def test_the_file_never_grows_past_its_bound_and_the_rest_is_counted(tmp_path: Path) -> None:
    """Before: every reject was appended, whatever the file's size (a flood of garbage filled the disk)."""
    path = tmp_path / "dead.jsonl"
    dl = DeadLetter(path, max_bytes=8192)
    for i in range(200):
        dl.write(f"not JSON: line {i}", stage="source:replay", raw="x" * 200)  # no exception: the caller goes on
    dl.close()
    lines = whole_lines(path)
    assert path.stat().st_size <= 8192 < path.stat().st_size + 260  # as full as whole lines make it
    assert dl.count == len(lines) > 0 and dl.count + dl.full == 200 and dl.lost == 0
    assert dl.by_reason == {"not JSON": dl.count} and dl.full_by_reason == {"not JSON": dl.full}
    assert [d["reason"] for d in lines] == [f"not JSON: line {i}" for i in range(dl.count)]


def test_the_bound_reached_exactly(tmp_path: Path, clock: Clock) -> None:
    """A line that ends exactly at the bound is written; one byte less and it is not."""
    probe = tmp_path / "probe.jsonl"
    DeadLetter(probe).write("bad", stage="s", raw="x")
    size = probe.stat().st_size
    for room, written in ((2 * size, 2), (2 * size - 1, 1)):
        path = tmp_path / f"dead-{room}.jsonl"
        dl = DeadLetter(path, max_bytes=room)
        for _ in range(3):
            dl.write("bad", stage="s", raw="x")
        assert (dl.count, dl.full, path.stat().st_size) == (written, 3 - written, written * size)


def test_a_line_larger_than_the_whole_bound_is_counted_and_the_next_small_one_written(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    dl = DeadLetter(path, max_bytes=4096)
    dl.write("huge", stage="s", raw="x" * 10_000)
    dl.write("small", stage="s", raw="x")
    assert (dl.count, dl.full) == (1, 1)
    assert [d["reason"] for d in whole_lines(path)] == ["small"]


@pytest.mark.parametrize("how", ["rename", "delete", "truncate"])
def test_a_rotated_file_gives_room_again(tmp_path: Path, how: str) -> None:
    """logrotate's rename, `rm`, and copytruncate (the same file cut to 0 bytes) each give the bound back."""
    path = tmp_path / "dead.jsonl"
    dl = DeadLetter(path, max_bytes=4096)
    for _ in range(60):  # 60 lines of ~200 bytes: past 4 KiB
        dl.write("bad", stage="s", raw="x" * 100)
    before = dl.count
    assert dl.full == 60 - before > 0
    if how == "rename":
        path.rename(tmp_path / "dead.jsonl.1")
    elif how == "delete":
        path.unlink()
    else:
        os.truncate(path, 0)
    dl.write("after rotation", stage="s", raw="x")
    assert (dl.count, dl.full) == (before + 1, 60 - before)
    assert [d["reason"] for d in whole_lines(path)] == ["after rotation"]


def test_concurrent_writers_keep_the_bound_and_whole_lines(tmp_path: Path) -> None:
    """DeadLetter is written from threads (the alert forwarder's): the size check and the write are one step."""
    path = tmp_path / "dead.jsonl"
    dl = DeadLetter(path, max_bytes=65536)
    go = threading.Barrier(8)

    def writer(n: int) -> None:
        go.wait()
        for i in range(300):
            dl.write(f"thread {n}", stage="s", raw=str(i) * (1 + i % 50))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dl.close()
    lines = whole_lines(path)
    assert path.stat().st_size <= 65536 and len(lines) == dl.count > 0
    assert dl.count + dl.full == 2400 and dl.full > 0


def test_a_file_already_past_the_bound_warns_once_at_start_and_the_run_goes_on(
        tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """Left by an earlier run: check() does not refuse it (the run starts), and one line says why rejects will not
    be written; the next warning comes a minute later, with the running count."""
    path = tmp_path / "dead.jsonl"
    path.write_bytes(b'{"old": 1}\n' * 500)
    caplog.set_level(logging.WARNING, logger="pipeline.deadletter")
    dl = DeadLetter(path, max_bytes=4096)
    dl.check()
    for _ in range(50):
        dl.write("bad", stage="s", raw="x")
    assert path.stat().st_size == 5500 and (dl.count, dl.full) == (0, 50)
    assert len(caplog.records) == 1, caplog.text
    assert "already 5500 bytes, dead_letter_max_bytes is 4 KiB: rejects will not be written until it is " \
           "rotated or removed" in caplog.text
    clock.now += 61
    dl.write("bad", stage="s", raw="x")
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage() == (f"{path} reached dead_letter_max_bytes (4 KiB): 51 reject(s) not "
                                              "written so far; rotate or remove it to make room")


def test_the_first_reject_past_the_bound_warns_then_once_a_minute(
        tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.deadletter")
    dl = DeadLetter(tmp_path / "dead.jsonl", max_bytes=2048)
    dl.check()
    assert not caplog.records  # a file under its bound: nothing to say
    for _ in range(100):
        dl.write("bad", stage="s", raw="x" * 100)
        clock.now += 0.1
    assert [r.getMessage().split("): ", 1)[1] for r in caplog.records] == [
        "1 reject(s) not written so far; rotate or remove it to make room"]
    clock.now += 60
    dl.write("bad", stage="s", raw="x" * 100)
    assert len(caplog.records) == 2 and f"): {dl.full} reject(s) not written so far" in caplog.records[1].getMessage()


def test_a_device_fills_no_disk_and_has_no_bound() -> None:
    """`pipeline tap` writes its rejects to /dev/null: it is never 'full'."""
    dl = DeadLetter("/dev/null", max_bytes=10)
    for _ in range(20):
        dl.write("bad", stage="s", raw="x" * 100)
    assert (dl.count, dl.full) == (20, 0)
