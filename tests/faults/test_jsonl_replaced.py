"""A JSONL sink's file deleted, rotated or replaced while the pipeline runs (real files, real renames)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.api import Context
from pipeline.errors import SinkFailed
from stages.sinks.jsonl import JsonlOptions, JsonlSink


def ids(path: Path) -> list[int]:
    return [orjson.loads(x)["id"] for x in path.read_bytes().splitlines()]


async def test_a_deleted_or_rotated_file_is_opened_again_not_written_into_the_void(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Lines went on into the file the sink opened at start: after `rm out.jsonl` every later event was
    written to an unlinked inode and lost without an error; after a rename (logrotate) nothing came back to
    the path. Now each flush checks that the path still names the open file and opens it again if not."""
    out = tmp_path / "out.jsonl"
    sink = JsonlSink(JsonlOptions(path=str(out), flush_interval=0), make_context("jsonl"))
    await sink.start()
    await sink.write([{"channel": "transcript", "id": 0}])
    out.unlink()  # deleted under the running sink
    await sink.write([{"channel": "transcript", "id": 1}])
    assert ids(out) == [1]
    out.rename(tmp_path / "out.jsonl.1")  # rotated by rename
    await sink.write([{"channel": "transcript", "id": 2}, {"channel": "transcript", "id": 3}])
    assert ids(tmp_path / "out.jsonl.1") == [1] and ids(out) == [2, 3]
    out.unlink()
    out.mkdir()  # a directory where the file was: a write error naming the path, the line dead-lettered
    with pytest.raises(SinkFailed, match=r"out\.jsonl: cannot open for writing"):
        await sink.write([{"channel": "transcript", "id": 4}])
    with pytest.raises(SinkFailed):
        await sink.close()
    dead = [orjson.loads(x) for x in sink.context.dead_letter.path.read_bytes().splitlines()]
    assert [d["event"]["id"] for d in dead] == [4]


async def test_a_symlink_put_where_the_file_was_is_refused(make_context: Callable[..., Context],
                                                          tmp_path: Path) -> None:
    """The file swapped for a symlink mid-run: the sink never writes through it (it kept writing to the
    old inode before, and would now follow the link if it simply reopened)."""
    out, target = tmp_path / "out.jsonl", tmp_path / "elsewhere"
    target.write_bytes(b"")
    sink = JsonlSink(JsonlOptions(path=str(out), flush_interval=0), make_context("jsonl"))
    await sink.start()
    await sink.write([{"channel": "transcript", "id": 0}])
    out.unlink()
    out.symlink_to(target)
    with pytest.raises(SinkFailed, match="symlink"):
        await sink.write([{"channel": "transcript", "id": 1}])
    assert target.read_bytes() == b""


def test_a_deleted_dead_letter_file_is_created_again(tmp_path: Path) -> None:
    """The dead-letter file removed while running: later rejects went into the deleted file."""
    from pipeline.deadletter import DeadLetter

    path = tmp_path / "dead.jsonl"
    dl = DeadLetter(path)
    dl.write("first", stage="test", event={"id": 0})
    path.unlink()
    dl.write("second", stage="test", event={"id": 1})
    dl.close()
    assert ids_of_events(path) == [1]


def ids_of_events(path: Path) -> list[int]:
    return [orjson.loads(x)["event"]["id"] for x in path.read_bytes().splitlines()]
