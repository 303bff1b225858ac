"""The on-disk spool behind `buffer: {type: disk}`: order, acks, restarts, torn tails, corruption, locking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from pipeline.api import BufferOptions
from pipeline.errors import StageError
from pipeline.runtime.buffers import DiskBuffer, MemoryBuffer
from pipeline.state.spool import Damage, Record, Spool


def payload(i: int, size: int = 10) -> bytes:
    return orjson.dumps([{"id": i, "pad": "x" * size}])


def read_all(sp: Spool) -> list[Record | Damage]:
    out: list[Record | Damage] = []
    while (rec := sp.read()) is not None:
        out.append(rec)
    return out


def ids(recs: list[Record | Damage]) -> list[int]:
    return [orjson.loads(r.payload)[0]["id"] for r in recs if isinstance(r, Record)]


def test_order_acks_and_segment_cleanup_across_restarts(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", segment_bytes=200)
    assert sp.open() == []
    ends = [sp.append(payload(i), 1) for i in range(20)]
    assert len(list((tmp_path / "s").glob("*.seg"))) > 3  # rotated
    got = read_all(sp)
    assert ids(got) == list(range(20)) and sp.pending_events == 20
    sp.ack(ends[9])
    assert sp.pending_events == 10
    sp.close()

    again = Spool(tmp_path / "s", segment_bytes=200)
    assert again.open() == []
    assert again.pending_events == 10
    assert ids(read_all(again)) == list(range(10, 20)), "acked records came back, or unacked ones were lost"
    again.ack(again.write_pos)
    assert again.pending_bytes == 0
    assert len(list((tmp_path / "s").glob("*.seg"))) == 1  # fully delivered segments are deleted
    again.append(payload(20), 1)
    again.close()

    third = Spool(tmp_path / "s", segment_bytes=200)
    third.open()
    assert ids(read_all(third)) == [20]
    third.close()


def test_torn_tail_is_reported_cut_off_and_new_records_append_cleanly(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s")
    sp.open()
    for i in range(3):
        sp.append(payload(i, 500), 1)
    sp.close()
    seg = next((tmp_path / "s").glob("*.seg"))
    seg.write_bytes(seg.read_bytes()[:-100])  # kill -9 in the middle of the third append

    sp = Spool(tmp_path / "s")
    damage = sp.open()
    assert len(damage) == 1 and "torn" in damage[0].reason
    assert damage[0].length == 12 + len(payload(2, 500)) - 100  # what is left of the torn record
    sp.append(payload(3), 1)
    assert ids(read_all(sp)) == [0, 1, 3]
    sp.close()


def test_ack_file_with_a_torn_slot_falls_back_to_the_previous_ack(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s")
    sp.open()
    ends = [sp.append(payload(i), 1) for i in range(4)]
    sp.ack(ends[0])  # generation 1, slot 1
    sp.ack(ends[1])  # generation 2, slot 0
    sp.close()
    ack = tmp_path / "s" / "ack"
    raw = bytearray(ack.read_bytes())
    raw[3] ^= 0xFF  # the newest slot is garbage (torn ack write)
    ack.write_bytes(bytes(raw))
    sp = Spool(tmp_path / "s")
    sp.open()
    assert ids(read_all(sp)) == [1, 2, 3]  # redelivers one record at most, never skips one
    sp.close()


def test_corrupt_record_in_an_older_segment_is_skipped_with_damage(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", segment_bytes=100)
    sp.open()
    for i in range(4):
        sp.append(payload(i, 80), 1)
    sp.close()
    first = sorted((tmp_path / "s").glob("*.seg"))[1]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF
    first.write_bytes(bytes(data))
    sp = Spool(tmp_path / "s", segment_bytes=100)
    assert sp.open() == []
    got = read_all(sp)
    assert ids(got) == [0, 2, 3]
    assert [d.reason for d in got if isinstance(d, Damage)] == ["record failed its CRC check"]
    sp.close()


def test_one_process_per_spool(tmp_path: Path) -> None:
    a = Spool(tmp_path / "s")
    a.open()
    with pytest.raises(StageError, match="in use by another pipeline"):
        Spool(tmp_path / "s").open()
    a.close()
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s").iterdir()}
    assert set(files.values()) == {0o600} and (tmp_path / "s").stat().st_mode & 0o777 == 0o700


async def test_memory_buffer_is_bounded_by_bytes_not_only_batches() -> None:
    """A stuck sink: puts stop (block) or dead-letter once max_bytes is reached, whatever the batch count."""
    rejected: list[int] = []
    buf = MemoryBuffer(BufferOptions(max_bytes=1000, when_full="dead_letter"), 1000,
                       lambda b, why: rejected.extend(e["id"] for e in b))
    for i in range(50):
        await buf.put(i, [{"id": i}], 300)
        assert buf.bytes <= 1000
    assert buf.pending_events == 3 and rejected == list(range(3, 50))

    blocking = MemoryBuffer(BufferOptions(max_bytes=1000), 1000, lambda b, why: None)
    for i in range(3):
        await blocking.put(i, [{"id": i}], 300)
    waiting = asyncio.create_task(blocking.put(3, [{"id": 3}], 300))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # backpressure by bytes
    item = await blocking.get()
    assert item is not None
    blocking.taken(item)
    await asyncio.wait_for(waiting, 1)


async def test_disk_buffer_spills_without_blocking_and_serves_in_order(tmp_path: Path) -> None:
    buf = DiskBuffer(BufferOptions(type="disk"), tmp_path / "d", 4, lambda b, why: None, lambda d: None,
                     segment_bytes=4096, cache_bytes=2000)
    buf.open()
    for i in range(200):  # nobody reads: never blocks, memory holds at most 4 batches
        await asyncio.wait_for(buf.put(i, [{"id": i, "pad": "y" * 50}], 80), 1)
    assert len(buf._cache) <= 4
    got: list[int] = []
    while len(got) < 200:
        item = await buf.get()
        assert item is not None
        got.extend(e["id"] for e in item.batch)
        buf.taken(item)
    assert got == list(range(200)) and buf.spooled_bytes == 0
    buf.close()


async def test_full_disk_buffer_blocks_or_dead_letters(tmp_path: Path) -> None:
    """max_bytes bounds the spool: `block` makes put wait until the sink acknowledges; `dead_letter` rejects."""
    rejected: list[int] = []
    dl = DiskBuffer(BufferOptions(type="disk", max_bytes=2000, when_full="dead_letter"), tmp_path / "dl", 4,
                    lambda b, why: rejected.extend(e["id"] for e in b), lambda d: None)
    dl.open()
    for i in range(10):
        await dl.put(i, [{"id": i, "pad": "z" * 400}], 420)
        assert dl.spooled_bytes <= 2000
    assert rejected == list(range(4, 10)) and dl.safe_upto == 9
    dl.close()

    blk = DiskBuffer(BufferOptions(type="disk", max_bytes=2000), tmp_path / "blk", 4, lambda b, why: None,
                     lambda d: None)
    blk.open()
    for i in range(4):
        await blk.put(i, [{"id": i, "pad": "z" * 400}], 420)
    waiting = asyncio.create_task(blk.put(4, [{"id": 4, "pad": "z" * 400}], 420))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    item = await blk.get()
    assert item is not None
    blk.taken(item)
    await asyncio.wait_for(waiting, 1)
    blk.close()


async def test_an_event_the_disk_buffer_cannot_encode_is_dead_lettered_alone(tmp_path: Path) -> None:
    """A plugin processor made one event JSON cannot hold: the spool dead-letters it, the rest is delivered, and
    the summary names it for what it is (before: counted as `buffer-full dead-lettered`)."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps({"channel": "transcript", "id": i}) + b"\n"
                                                 for i in range(6)))
    (tmp_path / "p.yaml").write_text(f"""
name: spoilt
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 3}}
stages: [{{type: "tests.slow_sink:Spoil", ids: [1, 3, 4, 5]}}]
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, buffer: {{type: disk}}}}]
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(tmp_path / "p.yaml")), install_signals=False)
    assert await rt.run() == 0, rt.error
    assert [orjson.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_bytes().splitlines()] == [0, 2]
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert [d["event_repr"].count("'id': ") for d in dead] == [1, 1, 1, 1]
    assert all(d["reason"].startswith("cannot spool: event is not JSON-encodable") for d in dead)
    summary = rt.summary()
    assert "not JSON-encodable dead-lettered 4" in summary and "buffer-full" not in summary, summary


def test_a_symlinked_segment_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    """Before: the segment was read through the link, found "torn" and truncated: the target file was emptied."""
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"my notes, not a spool\n")
    (tmp_path / "s").mkdir(mode=0o700)
    (tmp_path / "s" / f"{0:020d}.seg").symlink_to(victim)
    with pytest.raises(StageError) as refused:
        Spool(tmp_path / "s").open()
    assert victim.read_bytes() == b"my notes, not a spool\n"
    assert "refusing to open a spool segment through a symlink" in str(refused.value)


def test_a_symlinked_spool_file_is_one_line_from_pipeline_run(tmp_path: Path) -> None:
    """Before: an OSError traceback."""
    import subprocess
    import sys

    spool = tmp_path / "state/spool/sinks-0-jsonl"
    spool.mkdir(parents=True, mode=0o700)
    (spool / "ack").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript"}\n')
    (tmp_path / "p.yaml").write_text("""
name: sym
source: {type: replay, path: in.jsonl}
sinks: [{type: jsonl, path: out.jsonl, buffer: {type: disk}}]
state_dir: state
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "state/spool/sinks-0-jsonl/ack: refusing to open a spool ack file through a symlink" in res.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_undelivered_bytes_reads_a_spool_without_opening_it(tmp_path: Path) -> None:
    from pipeline.state.spool import undelivered_bytes

    sp = Spool(tmp_path / "s", segment_bytes=200)
    sp.open()
    ends = [sp.append(payload(i), 1) for i in range(10)]
    sp.ack(ends[3])
    assert undelivered_bytes(tmp_path / "s") == ends[-1] - ends[3]
    sp.ack(ends[-1])
    assert undelivered_bytes(tmp_path / "s") == 0  # fully delivered: nothing to warn about
    sp.close()
