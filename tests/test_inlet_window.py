"""The backfill dedupe window, packed in one buffer per channel, drops what a plain list of (key, start) does."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stages.sources import inlet as inlet_module
from stages.sources.inlet import Inlet


def reference(events: list[dict[str, Any]], keep_keys: int, keep_ms: int) -> list[bool]:
    """Which events pass: one channel, keys in a list with their starts; the oldest go past keep_keys, and
    while a number start older than the newest number start - keep_ms heads the list."""
    keys: dict[int, bool] = {}
    order: list[tuple[int, Any]] = []
    out = []
    for e in events:
        start, by_backfill = e["data"]["start"], e.get("backfill") is True
        k = hash((start, e["data"]["text"]))
        before = keys.get(k)
        out.append(not (before is not None and (by_backfill or before)))
        if before is None:
            keys[k] = by_backfill
            order.append((k, start))
            if len(order) > keep_keys:
                del keys[order.pop(0)[0]]
            if type(start) in (int, float):
                while type(order[0][1]) in (int, float) and order[0][1] < start - keep_ms:
                    del keys[order.pop(0)[0]]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_packed_window_passes_and_drops_what_a_plain_list_does(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inlet_module, "KEEP_KEYS", 200)  # count eviction and compaction (64 entries) both run
    rng = random.Random(seed)
    t = 1_700_000_000_000
    events = []
    for _ in range(6000):
        t += rng.choice((0, 0, 0, 40, 400, 1500))
        start: Any = rng.choice((t, t, t, t + 0.5, t - 31_000, str(t), None))  # late, odd and absent starts
        text = f"w{rng.randrange(12)}"  # repeats: duplicates inside and outside the window
        events.append({"channel": "transcript", "rtstream_id": "r", "backfill": rng.random() < 0.3,
                       "data": {"start": start, "text": text}})
    want = reference(events, 200, inlet_module.KEEP_MS)
    inlet = Inlet()
    got = []
    for i in range(0, len(events), 7):  # batches of 7
        batch = events[i:i + 7]
        passed = inlet.admit(batch)
        got += [any(p is e for p in passed) for e in batch]
    assert got == want and 100 < sum(want) < len(want) - 100
    seen = inlet._seen[("r", "transcript")]
    assert len(seen) == len(seen.keys) == inlet.keys_held <= 200
