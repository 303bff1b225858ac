"""The replay source reads each line only up to a limit: a line with no end in sight is never held whole."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from stages.sources import replay
from stages.sources.replay import ReplayOptions, ReplaySource

MakeCtx = Callable[..., Context]


async def read_all(src: ReplaySource) -> list[dict[str, Any]]:
    return [e for b in [b async for b in src.batches()] for e in b]


def dead_letters(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


async def test_a_line_longer_than_the_limit_is_skipped_without_being_held(
        make_context: MakeCtx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a line was read whole, whatever its length (a 32 MiB line held 32 MiB and more at once; a multi-GB
    file with no newline ran out of memory)."""
    monkeypatch.setattr(replay, "MAX_LINE", 1 << 20, raising=False)
    path = tmp_path / "r.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"channel": "transcript", "n": 1}\n')
        fh.write(b'{"channel": "transcript", "text": "' + b"x" * (32 << 20) + b'"}\n')
        fh.write(b'{"channel": "transcript", "n": 3}\n')
    ctx = make_context()
    src = ReplaySource(ReplayOptions(path=str(path), batch_size=4), ctx)  # holds at most 4 x 1 MiB at once
    tracemalloc.start()
    try:
        got = await read_all(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB while reading a 32 MiB line"
    assert [e.get("n") for e in got] == [1, 3]
    [dead] = dead_letters(tmp_path / "dead-letter.jsonl")
    assert dead["origin"]["line"] == 2 and "over the 1 MiB limit: skipped" in dead["reason"]
    assert src.position == path.stat().st_size and src.lines == 3


lines = st.one_of(
    st.builds(lambda n, pad: orjson.dumps({"channel": "transcript", "n": n, "pad": "y" * pad}),
              st.integers(0, 10**6), st.integers(0, 60)),
    st.sampled_from([b"", b"  ", b"[1]", b"{not json"]),
)


def feed(path: Path, data: bytes, cuts: list[int]) -> threading.Thread:
    """A writer thread for the named pipe `path`: `data` in writes of the sizes `cuts` (repeated)."""
    def write() -> None:
        with path.open("wb", buffering=0) as fh:  # waits for the reader to open the pipe
            at = 0
            for cut in itertools.cycle(cuts):
                if at >= len(data):
                    break
                fh.write(data[at:at + cut])
                at += cut

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, max_size=12), st.booleans(), st.integers(1, 4), st.booleans(),
       st.one_of(st.none(), st.lists(st.integers(1, 100), min_size=1, max_size=5)), st.sampled_from([7, 16, 64]))
async def test_bounded_reading_keeps_and_rejects_what_splitting_the_file_would(
        make_context: MakeCtx, tmp_path: Path, body: list[bytes], last_newline: bool, batch_size: int,
        paced: bool, pipe_writes: list[int] | None, piece: int) -> None:
    """The plain definition: split the file at newlines; a line (newline included) longer than MAX_LINE bytes is
    dead-lettered, the rest parsed as before. Both read paths (as fast as possible, and paced) agree with it,
    reading a file (in pieces of `piece` bytes at most, made whole again) or a named pipe that a writer fills
    `pipe_writes` bytes at a time."""
    limit = 64
    old = replay.MAX_LINE, replay.SKIP_CHUNK, replay.PIECE
    replay.MAX_LINE, replay.SKIP_CHUNK, replay.PIECE = limit, 16, piece
    writer = None
    try:
        data = b"\n".join(body) + (b"\n" if last_newline and body else b"")
        path = tmp_path / f"h{len(data)}-{batch_size}-{paced}-{pipe_writes is not None}.jsonl"
        path.unlink(missing_ok=True)
        if pipe_writes is None:
            path.write_bytes(data)
        else:
            os.mkfifo(path)
            writer = feed(path, data, pipe_writes)
        dead_path = tmp_path / "dead-letter.jsonl"
        dead_path.unlink(missing_ok=True)
        src = ReplaySource(ReplayOptions(path=str(path), batch_size=batch_size, speed=1e12 if paced else 0),
                           make_context())
        got = await asyncio.wait_for(read_all(src), 10)
    finally:
        replay.MAX_LINE, replay.SKIP_CHUNK, replay.PIECE = old
        if writer is not None:
            writer.join(5)
    split = data.split(b"\n")
    if split and split[-1] == b"":
        split.pop()
    whole = [raw + b"\n" if i < len(split) - 1 or data.endswith(b"\n") else raw for i, raw in enumerate(split)]
    too_long = {i + 1 for i, raw in enumerate(whole) if len(raw) > limit}
    want = [orjson.loads(raw) for i, raw in enumerate(whole)
            if i + 1 not in too_long and raw.strip() and raw.startswith(b'{"channel"') and raw.rstrip().endswith(b"}")]
    assert [e["n"] for e in got] == [e["n"] for e in want]
    skipped = sorted(d["origin"]["line"] for d in dead_letters(dead_path) if "limit: skipped" in d["reason"])
    assert skipped == sorted(too_long)
    assert src.position == len(data)


async def test_skipping_a_long_line_lets_the_event_loop_run_and_a_stop_end_it(tmp_path: Path) -> None:
    """The pipe reader went back to the loop only when the pipe was empty: a writer that stays ahead of it
    with one endless line (`cat /dev/zero > pipe`) held the loop, SIGTERM included, for as long as it wrote.
    A regular file (always readable) plays that writer here: 64 MiB with no newline."""
    from stages.sources.pipe_lines import CHUNK_BYTES, PipeLines

    path = tmp_path / "endless"
    path.write_bytes(b"y" * (64 << 20))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pipe = PipeLines(fd, 1 << 20)
        pipe._opened = True  # a file needs no writer to come first

        async def stop_soon() -> None:
            await asyncio.sleep(0)
            pipe.close()

        stopper = asyncio.create_task(stop_soon())
        assert await pipe.chunk() is None  # stopped inside the line: nothing whole to give
        await stopper
        assert os.lseek(fd, 0, os.SEEK_CUR) <= 2 * CHUNK_BYTES  # before: the whole 64 MiB read first
    finally:
        os.close(fd)
