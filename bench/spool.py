"""Benchmark: what `buffer: {type: disk}` costs per event.

1. The same replay -> filter -> enrich -> jsonl pipeline with the jsonl sink's
   default memory buffer (baseline) and with a disk buffer (every batch is
   appended to the spool and acknowledged after the write; the sink keeps up,
   so batches are served from memory). Best of several interleaved runs.
2. The buffer alone, sink keeping up: put, get and ack of each batch through
   a disk buffer vs a memory buffer; the difference is the spool's cost per
   event (encode, append, ack), free of the rest of the pipeline's noise.
3. The buffer alone, sink behind: every batch spilled and read back from disk
   (encode, append, read, CRC check, decode, ack).
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
from pathlib import Path

import orjson

from bench.common import Result, pipeline_config, ratio_result, timed_run, workdir, write_config
from bench.gen import dataset

TARGET = 0.7  # the disk-buffered pipeline keeps at least this share of the memory-buffered rate
BATCH = 1000


def _pipeline(src: Path, out: Path, kind: str) -> float:
    state = out / f"state-{kind}"
    shutil.rmtree(state, ignore_errors=True)
    cfg = pipeline_config(f"bench-spool-{kind}", {"type": "replay", "path": str(src)},
                          [{"type": "jsonl", "path": str(out / f"events-{kind}.jsonl"), "clear": True,
                            "buffer": {"type": kind}}], out, enrich=True)
    cfg["state_dir"] = str(state)
    seconds, _ = timed_run(write_config(out / f"spool-{kind}.yaml", cfg))
    return seconds


def _batches(src: Path) -> list[list[dict]]:
    """The input, decoded once; frozen out of the garbage collector's sight, as a running pipeline's
    heap is small (otherwise every collection rescans 100k+ input events and dominates the figure)."""
    with open(src, "rb") as fh:
        events = [orjson.loads(line) for line in fh]
    batches = [events[i:i + BATCH] for i in range(0, len(events), BATCH)]
    gc.collect()
    gc.freeze()
    return batches


async def _keeping_up(batches: list[list[dict]], out: Path, kind: str) -> float:
    """Seconds to pass every batch through a buffer whose sink takes each batch at once."""
    from pipeline.api import BufferOptions
    from pipeline.runtime.buffers import DiskBuffer, MemoryBuffer, SinkBuffer

    d = out / f"keep-{kind}"
    shutil.rmtree(d, ignore_errors=True)
    buf: SinkBuffer
    if kind == "disk":
        buf = DiskBuffer(BufferOptions(type="disk"), d, 16, lambda b, why: None, lambda dmg: None)
        buf.open()
    else:
        buf = MemoryBuffer(BufferOptions(), 16, lambda b, why: None)
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        await buf.put(i, b, 0)
        item = await buf.get()
        assert item is not None
        buf.taken(item)
    seconds = time.perf_counter() - t0
    buf.close()
    return seconds


async def _spill_and_read(batches: list[list[dict]], out: Path) -> tuple[float, int]:
    """Every batch goes to disk and comes back (no memory cache): the cost while a sink is behind."""
    from pipeline.api import BufferOptions
    from pipeline.runtime.buffers import DiskBuffer

    events = [e for b in batches for e in b]
    d = out / "spill"
    shutil.rmtree(d, ignore_errors=True)
    buf = DiskBuffer(BufferOptions(type="disk"), d, 16, lambda b, why: None, lambda dmg: None, cache_bytes=0)
    buf.open()
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        await buf.put(i, b, 0)
    spooled = buf.spooled_bytes
    buf.finish()
    got = 0
    while (item := await buf.get()) is not None:
        got += len(item.batch)
        buf.taken(item)
    seconds = time.perf_counter() - t0
    buf.close()
    assert got == len(events), (got, len(events))
    return seconds, spooled


def run(n: int, repeats: int = 3) -> list[Result]:
    src = dataset(n)
    out = workdir("spool")
    mem = disk = float("inf")
    for _ in range(repeats):
        mem = min(mem, _pipeline(src, out, "memory"))
        disk = min(disk, _pipeline(src, out, "disk"))
    res = ratio_result("disk buffer, sink keeping up (replay -> jsonl)", n / disk, n / mem, TARGET,
                       "memory buffer")
    res.notes.append(f"difference: {(disk - mem) / n * 1e6:+.2f} µs per event (whole pipeline, noisy)")
    batches = _batches(src)
    keep_mem = keep_disk = float("inf")
    for _ in range(repeats):
        keep_mem = min(keep_mem, asyncio.run(_keeping_up(batches, out, "memory")))
        keep_disk = min(keep_disk, asyncio.run(_keeping_up(batches, out, "disk")))
    alone = Result("disk buffer alone, sink keeping up", n / keep_disk)
    alone.notes.append(f"cost of the spool: {(keep_disk - keep_mem) / n * 1e6:.2f} µs per event "
                       f"(memory buffer: {keep_mem / n * 1e6:.3f} µs)")
    seconds, spooled = asyncio.run(_spill_and_read(batches, out))
    gc.unfreeze()
    spill = Result("disk buffer alone, sink behind (spill + read back)", n / seconds)
    spill.notes.append(f"{seconds / n * 1e6:.2f} µs per event, {spooled / n:.0f} spooled bytes per event")
    return [res, alone, spill]
