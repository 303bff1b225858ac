"""What a create's request costs the pipeline: memory while its session is held (real SDK, emulator, HTTP), and
the event loop's time to check its body."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.json_body import body_problem
from stages.controller.session_api import MAX_DEPTH
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api import running, session_calls


def containers_held(root: object) -> int:
    """Objects the garbage collector tracks that are reachable from `root` (what a full collection walks)."""
    seen = {id(root)}
    todo = [root]
    while todo:
        for child in gc.get_referents(todo.pop()):
            if gc.is_tracked(child) and id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return len(seen)


async def test_a_sessions_metadata_is_held_compactly_not_as_one_object_per_json_value(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """Metadata of 20,000 empty lists (a 60 KB body, under the default max_body_bytes) was held as 20,000 list
    objects: 1.5 MB of memory per session (25 times the body; 15 GB at the default max_sessions) that every full
    garbage collection walked. It is now held as its JSON text, and still shown, listed and sent as it was."""
    metadata: dict[str, Any] = {"plan": "pro", "deep": [[] for _ in range(20_000)], "n": [1, {"x": None}]}
    async with running(make_context, emulator) as live:
        status, view = await live.call("POST", "/v1/sessions",
                                      data=orjson.dumps({"end_user_id": "user-1", "metadata": metadata}))
        assert status == 201, view
        s = live.ctl.manager.sessions[view["session_id"]]
        assert containers_held(s.record) < 100
        assert view["metadata"] == metadata
        status, shown = await live.call("GET", f"/v1/sessions/{view['session_id']}")
        assert status == 200 and shown["metadata"] == metadata
        status, listed = await live.call("GET", "/v1/sessions")
        assert listed["sessions"][0]["metadata"] == metadata
        sent = [c["body"].get("metadata") for c in session_calls(emulator)]
        assert sent == [metadata]
        saved = orjson.loads(live.ctl.manager.store.path(view["session_id"]).read_bytes())
        assert saved["metadata"] == metadata


def nested(depth: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    inner: Any = body
    for _ in range(depth - 1):
        inner["k"] = {}
        inner = inner["k"]
    return body


def test_checking_a_bodys_depth_costs_less_than_parsing_it() -> None:
    """The depth check of a body of empty lists (the most containers a body of its size holds) took 1.6 times
    as long as orjson took to parse it: 2.3 s of event loop for 16 MiB (api.max_body_bytes allows it), on top of
    the parse. It now costs a fraction of the parse, and still tells the same depths apart."""
    def deeper(body: Any) -> bool:
        return body_problem(body, b"", MAX_DEPTH) is not None

    assert not deeper(nested(MAX_DEPTH)) and deeper(nested(MAX_DEPTH + 1))
    assert deeper({"a": [1, {"b": [[{"c": nested(MAX_DEPTH - 5)}]]}]})
    assert not deeper({"a": [1, {"b": [[{"c": nested(MAX_DEPTH - 6)}]]}], "d": "[[[["})
    raw = b'{"end_user_id":"u","metadata":{"a":[' + b",".join([b"[]"] * 700_000) + b"]}}"  # 2 MiB
    parse = check = float("inf")
    for _ in range(3):  # the best of three: a busy machine slows both alike
        began = time.perf_counter()
        body = orjson.loads(raw)
        parse = min(parse, time.perf_counter() - began)
        began = time.perf_counter()
        assert not deeper(body)
        check = min(check, time.perf_counter() - began)
    assert check < 0.8 * parse, (check, parse)


_scalars = (st.integers(min_value=-(10**40), max_value=10**40)
            | st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1])
            | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e19, -1e19, 2.5e30, 9.3e18])
            | st.text(alphabet="abc0123456789", max_size=30) | st.booleans() | st.none())
_documents = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(alphabet="abk", max_size=3), inner, max_size=4), max_leaves=20)


def _has_wide_int(doc: Any) -> bool:
    if type(doc) is int:
        return not -(2**63) <= doc < 2**64
    if isinstance(doc, dict):
        return any(_has_wide_int(v) for v in doc.values())
    return isinstance(doc, list) and any(_has_wide_int(v) for v in doc)


@settings(max_examples=400, deadline=None)
@given(_documents, st.sampled_from([(",", ":"), (", ", ": ")]))
def test_a_body_is_refused_exactly_when_it_holds_an_integer_beyond_64_bits(doc: Any, separators: Any) -> None:
    """orjson reads such an integer as a float, silently: the check must refuse those bodies and no other (the
    standard library writes the document, with integers of any size)."""
    raw = json.dumps({"metadata": doc}, separators=separators).encode()
    problem = body_problem(orjson.loads(raw), raw, MAX_DEPTH)
    assert (problem is not None) == _has_wide_int(doc), (raw, problem)


def test_an_integer_beyond_64_bits_after_many_long_ids_is_still_refused() -> None:
    """The check looks at MAX_RUNS runs of 19+ digits at most; past them it accepted the body: 10,000 snowflake
    IDs (19 digits, within 64 bits) before an integer beyond 64 bits let that integer be rounded to a float
    without a word. A body it cannot finish checking is now refused."""
    from stages.controller.json_body import MAX_RUNS

    ids = b",".join([b"1234567890123456789"] * MAX_RUNS)
    raw = b'{"metadata":{"ids":[' + ids + b'],"n":123456789012345678901234567890}}'
    problem = body_problem(orjson.loads(raw), raw, MAX_DEPTH)
    assert problem is not None and "64 bits" in problem, problem
    fine = b'{"metadata":{"ids":[' + ids + b'],"n":12345678901234567890}}'  # 20 digits, within 64 bits
    assert body_problem(orjson.loads(fine), fine, MAX_DEPTH) is None
