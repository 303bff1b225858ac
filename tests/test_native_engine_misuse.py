"""The rules stage's C engine object stays memory-safe when Python code misuses it.

`_fastrules.Engine` is driven by the rules stage, but it is a Python object: its
`__init__` can be called again (a failed build must leave no half-built engine),
Python code it calls mid-batch (a rule's stream-name test, an event's `__eq__`)
can reach it or the stage's counters. Each case runs in a child process, so a
crash fails its test instead of the suite; a clean error is what is expected.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
from stages.processors import _fastrules as F
from stages.processors.rules import fold, nfc, _stream_of, _cooled, _source_of
from pipeline.events import event_time_ms
CALLS = (fold, nfc, event_time_ms, _stream_of, _cooled, _source_of)
WORDS = {"code": (((0, "code"),), ()), "terminal": (((0, "terminal"), (1, "terminal")), ())}
TABLES = [(WORDS, "transcript")]
RULES = [("a|", "a", "info", 0, None), ("b|", "b", "info", 0, None)]
class S(str):
    pass
def run(engine, events, counts):
    try:
        out = engine.process(events, {}, None, 0, 10**15, counts)
        print("alerts", len(out[1]))
    except Exception as exc:
        print("raised", type(exc).__name__)
"""

CASES = {
    # a second __init__ fails on its rules: the tables were rebuilt, the channel map not yet
    "init_fails_on_a_rule": """
        engine = F.Engine(TABLES, {"transcript": 0}, RULES, *CALLS)
        try:
            engine.__init__(TABLES, {"transcript": 0}, [RULES[0], ("b|", "b", "info", "x", None)], *CALLS)
        except TypeError:
            pass
        # as many counts as rules were read before the bad one
        run(engine, [{"channel": S("transcript"), "data": {"text": "code terminal", "start": 1}}], [0])
    """,
    # a second __init__ fails on its second table
    "init_fails_on_a_table": """
        engine = F.Engine(TABLES, {"transcript": 0}, RULES, *CALLS)
        try:
            engine.__init__([TABLES[0], ({"x": (None, ())}, 5)], {"transcript": 0}, RULES, *CALLS)
        except TypeError:
            pass
        run(engine, [{"channel": S("transcript"), "data": {"text": "code terminal", "start": 1}}], [])
    """,
    # a rule's stream-name test rebuilds the engine with fifty rules while it fires
    "init_called_while_processing": """
        engine = None
        def names(name):
            big = {f"w{i}": (((i, f"w{i}"),), ()) for i in range(50)}
            engine.__init__([(big, "audio")], {"audio": 0}, [(f"r{i}|", f"r{i}", "info", 5, None)
                                                             for i in range(50)], *CALLS)
            return True
        engine = F.Engine(TABLES, {"transcript": 0}, [("a|", "a", "info", 5, names), RULES[1]], *CALLS)
        run(engine, [{"channel": "transcript", "rtstream_id": "r", "data": {"text": "code", "start": 1}}] * 3,
            [0, 0])
    """,
    # the stage's counters, emptied by Python code the engine calls mid-batch
    "counts_emptied_while_processing": """
        counts = [0, 0]
        def names(name):
            counts.clear()
            return True
        engine = F.Engine(TABLES, {"transcript": 0}, [("a|", "a", "info", 0, names), RULES[1]], *CALLS)
        run(engine, [{"channel": "transcript", "data": {"text": "code", "start": 1}}], counts)
    """,
}

EXPECTED = {
    "init_fails_on_a_rule": "raised ValueError",  # no rules left: the counts do not fit
    "init_fails_on_a_table": "raised RuntimeError",
    "init_called_while_processing": "raised RuntimeError",
    "counts_emptied_while_processing": "raised IndexError",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_misusing_the_engine_object_raises_instead_of_crashing(case: str) -> None:
    code = PRELUDE + textwrap.dedent(CASES[case])
    r = subprocess.run([sys.executable, "-X", "dev", "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"the child died ({r.returncode}):\n{r.stderr[-3000:]}"
    assert r.stdout.strip() == EXPECTED[case]


def test_the_engine_works_again_after_a_good_rebuild() -> None:
    """A failed build leaves no engine; a good one afterwards makes it whole again."""
    code = PRELUDE + textwrap.dedent("""
        engine = F.Engine(TABLES, {"transcript": 0}, RULES, *CALLS)
        try:
            engine.__init__(TABLES, {"transcript": 0}, [RULES[0], ("b|", "b", "info", "x", None)], *CALLS)
        except TypeError:
            pass
        engine.__init__(TABLES, {"transcript": 0}, RULES, *CALLS)
        run(engine, [{"channel": S("transcript"), "data": {"text": "code terminal", "start": 1}}], [0, 0])
    """)
    r = subprocess.run([sys.executable, "-X", "dev", "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "alerts 2"
