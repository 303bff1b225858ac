"""Every benchmark still runs and reports numbers (tiny inputs; no speed is asserted here)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.__main__ as bench_main
import bench.sessions as sessions_bench
from bench import (
    bytewax_peer,
    common,
    faust_scaling,
    gen,
    hits,
    http_view,
    kafka,
    latency,
    memory,
    replay,
    rules_scaling,
    spool,
    ws_ingest,
)
from bench.common import Result
from bench.gen import dataset, events, keywords
from stages.controller.session_store import SessionStore


@pytest.fixture(autouse=True, scope="module")
def own_output_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Inputs and outputs in a temporary directory (a `make bench` may be using bench/out)."""
    out = tmp_path_factory.mktemp("bench-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_OUT", str(out))  # for the benchmarks' child processes
        mp.setattr(gen, "OUT", out)
        mp.setattr(common, "OUT", out)
        yield


def numbers(results: list[Result], *, allow_skip: bool = False) -> None:
    assert results
    for r in results:
        if r.skipped is not None:
            assert allow_skip, r.line()
            assert r.line().endswith(r.skipped) and "skipped: " in r.line()
            continue
        assert r.ours is not None and r.ours > 0 and math.isfinite(r.ours), r.line()
        if r.baseline is not None:
            assert r.baseline > 0 and math.isfinite(r.baseline), r.line()
            assert "ratio" in r.line()
        assert r.line().startswith(f"{r.name}: ours ")
        if r.target:
            assert r.ok is not None and (" PASS" in r.line() or " MISS" in r.line())


def test_generator_is_deterministic_and_seed_shaped() -> None:
    a, b = list(events(3000)), list(events(3000))
    assert a == b and len(a) == 3000
    assert a[0]["event"] == "capture_session.created"
    active = a[2]
    assert active["event"] == "capture_session.active" and len(active["data"]["rtstreams"]) == 3
    chans = {e.get("channel") for e in a}
    assert {"transcript", "visual_index", "audio_index"} <= chans
    assert any(e.get("data", {}).get("is_final") is False for e in a)
    assert all("ts" in e and "unix_ts" in e for e in a)
    assert len(set(keywords(500))) == 500 and keywords(10)[:3] == keywords(1000)[:3]
    path = dataset(1000)
    assert path.read_bytes().count(b"\n") == 1000 and path.parent == gen.OUT != common.ROOT / "bench" / "out"


def test_replay() -> None:
    numbers(replay.run(2000, repeats=1))


def test_http_view() -> None:
    res = http_view.run(2000, repeats=1)
    numbers(res)
    assert "tap client" in res[1].name and "was sent 2,000 events" in res[1].notes[0]


def test_hits() -> None:
    results = hits.run(3000, repeats=1)
    numbers(results)
    assert [r.name.split()[0] for r in results] == ["hits", "hits", "hits:", "storm", "storm:"]
    for r in (results[2], results[4]):  # the rules stage alone: its notes, the last three in this order
        assert [n[:18] for n in r.notes[-3:]] == ["with a saved state", "the same hits with", "so each alert adds"]


def test_rules_alone_keeps_the_state_it_was_asked_for_in_every_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """`saved=False` times a plain state store in every repeat (the repeats after the first used the saved
    state's change-tracking dicts: the flag was overwritten by the one switching the C engine)."""
    from pipeline.api import Context
    from pipeline.state.store import TrackedDict
    from stages.processors import rules as rules_mod

    kinds: list[tuple[bool, bool]] = []
    real = rules_mod.Rules.__init__

    def spy(self: rules_mod.Rules, options: rules_mod.RulesOptions, context: Context) -> None:
        real(self, options, context)
        kinds.append((isinstance(context.state.get("rules.last_fired"), TrackedDict), self._engine is not None))

    monkeypatch.setattr(rules_mod.Rules, "__init__", spy)
    rules = hits.hit_rules(keywords(hits.N_RULES * hits.PER_RULE), "30s")
    hits.rules_alone(dataset(500), rules, 500, repeats=3)
    hits.rules_alone(dataset(500), rules, 500, repeats=3, saved=True, native=False)
    assert kinds == [(False, True)] * 3 + [(True, False)] * 3


def test_spool() -> None:
    res = spool.run(2000, repeats=1)
    numbers(res)
    assert [r.name.split(",")[0] for r in res] == ["disk buffer", "disk buffer alone", "disk buffer alone"]


def test_rules_scaling() -> None:
    res = rules_scaling.run(2000)
    numbers(res)
    assert [r.name for r in res] == [f"rules stage, {k:,} keywords" for k in rules_scaling.SIZES]


def test_state_store() -> None:
    from bench import state_store

    [res] = state_store.run(2000)
    numbers([res])
    assert any("time in flush" in n for n in res.notes) and any("distinct rtstream ids" in n for n in res.notes)
    # 2,000 events are 2 batches of 1024, not 1 (floor division): both changed state, which read "200%"
    assert "2 flushes (100% of batches changed state)" in res.notes[0], res.notes[0]


def test_memory() -> None:
    numbers(memory.run(2000))


def test_ws_ingest() -> None:
    res = ws_ingest.run(300, repeats=1)
    numbers(res)
    # the frame server answers the pipeline's close as a server does: the stop used to wait out the whole
    # drain_timeout (30 s) for it, and that wait counted as ingest time (~10 ev/s)
    assert res[2].ours is not None and res[2].ours > 1_000, res[2].line()


def test_latency() -> None:
    res = latency.run(500)
    numbers(res)
    assert all(r.unit == "ms" for r in res)


def test_kafka() -> None:
    numbers(kafka.run(3000), allow_skip=kafka.available() is not None)


def test_faust_scaling() -> None:
    numbers(faust_scaling.run(2000), allow_skip=True)


def test_sessions() -> None:
    res = sessions_bench.run(4, window=1.0)
    numbers(res)
    assert all(r.unit == "ms" and "4 active (4 bound before the window)" in r.notes[0] for r in res)


def test_sessions_bound_counts_saved_records_with_their_indexes(tmp_path: Path) -> None:
    """The window waits for every session's AI pipelines: a record counts once it names both indexes."""
    store = SessionStore(tmp_path)
    index = {"rtstream_id": "rts-d1", "scene_index_id": "idx-1"}
    store.save({"session_id": "cap-none", "status": "created"})
    store.save({"session_id": "cap-one", "indexes": [index]})
    store.save({"session_id": "cap-two", "indexes": [index, {**index, "rtstream_id": "rts-d2"}]})
    assert store.flush()
    (store.dir / "cap-torn.json").write_text('{"session_id": "cap-torn", "indexes": [')
    assert sessions_bench.bound_sessions(store.dir, 2) == 1
    assert sessions_bench.bound_sessions(store.dir, 1) == 2


def test_bytewax_peer() -> None:
    if bytewax_peer.available() is not None:
        pytest.skip("bytewax is a bench extra: pip install -e '.[bench]'")
    numbers(bytewax_peer.run(2000))


def test_results_file_keeps_the_optimisation_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "RESULTS.md"
    target.write_text(f"# Results\n\n{bench_main.START}\nold figures\n{bench_main.END}\n\n## Optimisation log\nkept\n")
    monkeypatch.setattr(bench_main, "RESULTS", target)
    bench_main.write_results({"x": [Result("x", 5.0, baseline=10.0, target="≥ 0.4", ok=True)]}, "make bench")
    text = target.read_text()
    assert "old figures" not in text and "x: ours 5 ev/s | baseline 10.0 ev/s | ratio 0.50 (target ≥ 0.4) PASS" in text
    assert text.endswith("## Optimisation log\nkept\n") and "| nproc |" in text


def test_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["--only", "nope"])
    assert exc.value.code == 2 and "unknown benchmark nope" in capsys.readouterr().err


def test_the_readme_table_lists_every_benchmark() -> None:
    """`python -m bench --only NAME` takes the names of the README's table; `http_view` was missing from it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| benchmark | measures | target |"):readme.index("Last full run")]
    assert sorted(re.findall(r"(?m)^\| `(\w+)` \|", table)) == sorted(bench_main.BENCHMARKS)
