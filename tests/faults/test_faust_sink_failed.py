"""A faust worker whose jsonl sink fails mid-run: each event it could not write is dead-lettered once.

Real `pipeline worker` process, the real test broker, a real ENOSPC (/dev/full).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
import yaml

from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.faults.test_faust_attacks import gated_config, produce, run_worker

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")]


async def test_a_full_disk_dead_letters_each_event_once_and_names_the_sink(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: the jsonl sink dead-lettered the lines it could not write, then the worker dead-lettered the same
    events again ("sink failed before writing"): every event twice in the file, and twice in `failed`."""
    name = f"full{os.getpid()}"
    cfg = gated_config(tmp_path, kafka_broker, name, tmp_path / "out/lines.jsonl")
    doc = yaml.safe_load(cfg.read_text())
    doc["sinks"] = [{"type": "jsonl", "path": "/dev/full"}]
    cfg.write_text(yaml.safe_dump(doc))
    await produce(kafka_broker, name, [{"channel": "transcript", "capture_session_id": "cap-f", "seq": n}
                                       for n in range(3)])
    code, text = await run_worker(cfg, tmp_path)
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1] == (
        "pipeline: sinks[0]:jsonl: /dev/full: cannot write: No space left on device"), text[-3000:]
    dead = [orjson.loads(x) for x in (tmp_path / "out/dead-letter.jsonl").read_bytes().splitlines()]
    seqs = sorted(d["event"]["seq"] for d in dead)
    assert seqs == sorted(set(seqs)) and set(seqs) <= {0, 1, 2} and seqs, dead
