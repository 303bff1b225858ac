"""Building a rules stage (at start and at every reload, on the event loop) does the work once per distinct set
of rules, not once per channel.

Each rule watches three channels by default, and its keywords were added, folded and built into an
Aho-Corasick automaton three times, also when the C engine, which never uses the automata, ran the stage:
one rule of 90,000 keywords took 2.4 s to build (the event loop held meanwhile at a reload), now 0.4 s.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import ahocorasick_rs
import pytest

from stages.processors.rules import Rules, RulesOptions

CHANNELS = ("transcript", "visual_index", "audio_index")


def _fired(stage: Rules) -> list[tuple[str, str]]:
    out = stage.process([{"channel": ch, "rtstream_id": ch, "data": {"text": "the code and the deploy", "start": 1}}
                         for ch in CHANNELS])
    return [(e["rtstream_id"], e["data"]["event_label"]) for e in out if e["channel"] == "alert"]


@pytest.mark.parametrize("native", [True, False])
def test_channels_watched_by_the_same_rules_share_one_automaton(make_context: Any, native: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Rules, "native", native)
    opts = RulesOptions.model_validate({"rules": [
        {"name": "code", "keywords": ["code", "stack trace"]},  # every text channel
        {"name": "deploy", "keywords": ["deploy"], "channels": ["transcript"]}]})
    with mock.patch.object(ahocorasick_rs, "AhoCorasick", wraps=ahocorasick_rs.AhoCorasick) as built:
        stage = Rules(opts, make_context())
    assert (stage._engine is not None) == native
    # C engine: no automaton at all; Python path: one for transcript (both rules), one for the other two channels
    assert built.call_count == (0 if native else 2), built.call_count
    assert _fired(stage) == [("transcript", "code"), ("transcript", "deploy"), ("visual_index", "code"),
                             ("audio_index", "code")]
