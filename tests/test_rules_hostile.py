"""What a rule author can write that must give one clear error line or a working stage, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from stages.processors.rules import Rules, RulesOptions
from tests.test_authoring import cli

HEAD = """name: t
source: {type: replay, path: in.jsonl}
stages:
  - type: rules
    rules:
"""
SINKS = "sinks: [{type: jsonl, path: out.jsonl}]\n"


def _write(tmp_path: Path, rules: str) -> Path:
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript", "rtstream_id": "r", '
                                       '"data": {"text": "code here", "start": 1000}}\n')
    p = tmp_path / "p.yaml"
    p.write_text(HEAD + rules + SINKS)
    return p


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1" + "0" * 400, "1" + "0" * 400 + "s"])
@pytest.mark.parametrize("key", ["cooldown", "window"])
def test_a_duration_no_clock_has_is_one_error_line(tmp_path: Path, key: str, value: str) -> None:
    """`cooldown: .inf` passed validation and the run then died with OverflowError in the rules stage."""
    extra = ", min_count: 2" if key == "window" else ""
    p = _write(tmp_path, f"      - {{name: a, keywords: [code], {key}: {value}{extra}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    [line] = str(info.value).splitlines()
    assert f"stages[0].rules[0].{key}: expected a duration like 30s" in line


def test_a_cooldown_longer_than_the_c_engine_holds_still_runs(tmp_path: Path) -> None:
    """A finite cooldown past 2**63 ms passed validation and the C engine refused it with a traceback."""
    p = _write(tmp_path, "      - {name: a, keywords: [code], cooldown: 99999999999999999999999999d}\n")
    res = cli("run", str(p), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert '"event_label":"a"' in (tmp_path / "out.jsonl").read_text().replace(" ", "")


def test_a_huge_cooldown_is_still_a_cooldown(make_context) -> None:  # type: ignore[no-untyped-def]
    opts = RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"], "cooldown": 1e30}]})
    stage = Rules(opts, make_context())
    events = [{"channel": "transcript", "rtstream_id": "r", "data": {"text": "code", "start": t}}
              for t in (1, 10**15, 10**18)]
    stage.process(events)
    assert stage.fired == 1


def _labels(make_context: object, native: bool, spec: list[dict[str, object]], text: str) -> list[str]:
    saved = Rules.native
    Rules.native = native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": spec}), make_context())  # type: ignore[operator]
    finally:
        Rules.native = saved
    assert (stage._engine is not None) == (native and spec[0].get("match", "word") == "word")
    out = stage.process([{"channel": "transcript", "rtstream_id": "r", "data": {"text": text, "start": 1}}])
    return [e["data"]["event_label"] for e in out if e.get("origin") == "rules"]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("match", ["word", "substring"])
@pytest.mark.parametrize("keyword", ["ΟΔΟΣ", "οδος", "οδοσ"])
@pytest.mark.parametrize("text", ["ΟΔΟΣ", "οδος", "οδοσ", "ΟΔΟΣ İstanbul", "İ οδος", "ΟΔΟΣ."])
def test_a_final_sigma_folds_like_any_other_sigma(make_context, native: bool, match: str, keyword: str,
                                                  text: str) -> None:  # type: ignore[no-untyped-def]
    """Case is folded one character per character: a capital sigma is the small one wherever it stands.
    str.lower() writes a final sigma at a word's end, but only when no "İ" elsewhere made the stage fold per
    character, so a keyword "ΟΔΟΣ" matched "ΟΔΟΣ" and not "ΟΔΟΣ İstanbul"."""
    spec = [{"name": "a", "keywords": [keyword], "match": match}]
    assert _labels(make_context, native, spec, text) == ["a"]


@pytest.mark.parametrize("native", [False, True])
def test_a_second_rules_stage_does_not_forget_the_first_ones_cooldowns(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """Both rules stages keep their state in the same saved maps. The second stage (no cooldown: it forgets
    after state_ttl, 10m) swept the first stage's 1h cooldown away after 10 minutes: `code` fired again 25
    minutes after it had fired, inside its cooldown."""
    from pipeline.api import StateStore

    state = StateStore()
    saved = Rules.native
    Rules.native = native
    try:
        first = Rules(RulesOptions.model_validate({"rules": [{"name": "long", "keywords": ["code"],
                                                              "cooldown": "1h"}]}), make_context(state=state))
        second = Rules(RulesOptions.model_validate({"rules": [{"name": "short", "keywords": ["other"]}]}),
                       make_context(state=state))
    finally:
        Rules.native = saved
    t0 = 1_700_000_000_000
    for seconds, text in [(0, "code"), (60, "other"), (700, "other"), (1400, "other"), (1500, "code")]:
        batch = [{"channel": "transcript", "rtstream_id": "r", "data": {"text": text, "start": t0 + seconds * 1000}}]
        second.process(first.process(batch))
    assert (first.fired, second.fired) == (1, 3)
    assert "long|r" in state.get("rules.last_fired")


def test_a_second_rules_stage_leaves_the_first_ones_keys_under_its_cap(make_context) -> None:  # type: ignore[no-untyped-def]
    """`max_state_keys` bounds a stage's own keys: the other stage's keys in the shared map are not its to drop."""
    from pipeline.api import StateStore

    state = StateStore()
    first = Rules(RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"], "cooldown": "1h"}],
                                               "max_state_keys": 100}), make_context(state=state))
    second = Rules(RulesOptions.model_validate({"rules": [{"name": "b", "keywords": ["other"], "cooldown": "1h"}],
                                                "max_state_keys": 100}), make_context(state=state))
    t0 = 1_700_000_000_000
    first.process([{"channel": "transcript", "rtstream_id": f"r{i}", "data": {"text": "code", "start": t0 + i}}
                   for i in range(90)])
    for n in range(5):
        second.process([{"channel": "transcript", "rtstream_id": f"s{n}-{i}",
                         "data": {"text": "other", "start": t0 + 100 + i}} for i in range(60)])
    keys = state.get("rules.last_fired")
    assert sum(k.startswith("a|") for k in keys) == 90
    assert 90 <= sum(k.startswith("b|") for k in keys) <= 100


def test_rule_names_are_unique_in_a_pipeline_and_have_no_bar(tmp_path: Path) -> None:
    """A rule's name keys its saved cooldowns ("<name>|<rtstream>"): two rules of one name shared a cooldown
    (the second rule's alert was silenced by the first's), and a "|" in a name let rule "a" on rtstream "b|x"
    share rule "a|b"'s on "x" (a reload that changed "a" also dropped the state of "a|b")."""
    text = (HEAD + "      - {name: dup, keywords: [code], cooldown: 1m}\n"
            "      - {name: dup, keywords: [terminal], cooldown: 1m}\n"
            "      - {name: \"a|b\", keywords: [code]}\n"
            "  - type: rules\n    rules:\n      - {name: dup, keywords: [slack]}\n"
            "  - type: rules\n    enabled: false\n    rules:\n      - {name: dup, keywords: [slack]}\n" + SINKS)
    (tmp_path / "in.jsonl").touch()
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "p.yaml", env={})
    lines = str(info.value).splitlines()
    taken = "is taken by stages[0].rules[0]: rule names key the saved cooldowns and windows, so each rule needs its own"
    assert lines == [
        f"{tmp_path}/p.yaml:7:10: stages[0].rules[1].name: rule name 'dup' {taken}",
        f"{tmp_path}/p.yaml:8:10: stages[0].rules[2].name: a rule name is not empty and has no '|' (it separates "
        "rule and rtstream in the saved cooldowns), got 'a|b'",
        f"{tmp_path}/p.yaml:11:10: stages[1].rules[0].name: rule name 'dup' {taken}"], lines


def test_a_wrong_keyword_or_count_is_shown_not_masked_as_a_secret(tmp_path: Path) -> None:
    """Every key path holding "key" was treated as a secret: `keywords: code` said "expected a list, got '***'",
    so the author could not see which value was wrong. A real secret (`api_key`) stays masked."""
    p = _write(tmp_path, "      - {name: a, keywords: code}\n      - {name: b, keywords: [code, 5]}\n"
                         "    max_state_keys: lots\n")
    p.write_text(p.read_text().replace("name: t\n", "name: t\nvideodb: {api_key: [hunter2]}\n"))
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    lines = str(info.value).splitlines()
    assert any(ln.endswith("videodb.api_key: expected a string, got '***'") for ln in lines), lines
    assert any(ln.endswith("stages[0].rules[0].keywords: expected a list, got 'code'") for ln in lines), lines
    assert any(ln.endswith("stages[0].rules[1].keywords[1]: expected a string, got 5") for ln in lines), lines
    assert any(ln.endswith("stages[0].max_state_keys: expected an integer, got 'lots'") for ln in lines), lines


def test_fold_is_lower_one_character_per_character() -> None:
    """fold() lowers the whole text at C speed (it joined 10 MB character by character: 6 s for one event)
    and gives what lowering each character alone gives, with a final sigma as any other."""
    import sys

    from stages.processors.matchers import fold

    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    per_char = "".join(ch.lower()[0] for ch in every).replace("\u03c2", "\u03c3")
    assert fold(every) == per_char
    assert fold("\u039f\u03a3 \u0130\u03a3") == "\u03bf\u03c3 i\u03c3"  # "ΟΣ İΣ": each sigma the small one


def test_folding_a_long_text_with_an_i_dot_costs_about_what_lowering_it_costs() -> None:
    """fold() joined a text with an "İ" character by character: 0.16 s per MB on every such event, 40 times
    str.lower(); a text of the source's default frame limit (1 MB) spent that much before any keyword lookup."""
    import timeit

    from stages.processors.matchers import fold

    text = ("İ" + "a" * 9) * 100_000 + " code"
    lower = min(timeit.repeat(text.lower, number=1, repeat=5))
    folded = min(timeit.repeat(lambda: fold(text), number=1, repeat=5))
    assert folded < 8 * lower, (folded, lower)


def test_a_keyword_repeated_through_a_long_text_is_handled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every overlapping occurrence of a substring keyword went through the Python loop again: "aaaa" in a 1 MB
    run of "a" (one occurrence per character) cost 1.2 s of one event; now each key is settled once."""
    from stages.processors import matchers

    calls = []
    real = matchers._add
    monkeypatch.setattr(matchers, "_add", lambda hits, owners: (calls.append(1), real(hits, owners)))
    subs, words = matchers.SubstringMatcher(), matchers.WordMatcher()
    subs.add(0, "aaaa")
    words.add(1, "code")
    words.add(1, "pass word")
    hits: matchers.Hits = {}
    matchers.Scanner(words, subs).match("a" * 100_000 + " code" * 1000 + " pass word" * 3, hits)
    assert hits == {0: ["aaaa"], 1: ["code", "pass word"]}
    assert len(calls) <= 4, len(calls)


def test_state_of_a_rule_no_stage_has_is_still_forgotten(make_context) -> None:  # type: ignore[no-untyped-def]
    """A cooldown saved by a rule that was since renamed (state.db of an earlier config) is no stage's own, and
    still goes by event time; one of a rule that another live stage has stays for that stage to forget."""
    from pipeline.api import StateStore

    state = StateStore()
    t0 = 1_700_000_000_000
    state.get("rules.last_fired").update({"renamed|r": t0, "other|r": t0})
    other = Rules(RulesOptions.model_validate({"rules": [{"name": "other", "keywords": ["x"], "cooldown": "1d"}]}),
                  make_context(state=state))
    stage = Rules(RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"]}]}),
                  make_context(state=state))
    stage.process([{"channel": "transcript", "rtstream_id": "r", "data": {"text": "code", "start": t0 + 3_600_000}}])
    assert sorted(state.get("rules.last_fired")) == ["other|r"]
    assert other.fired == 0


def test_a_regex_matching_everywhere_in_a_long_text_does_not_stall_the_stage(make_context) -> None:  # type: ignore[no-untyped-def]
    """RE2 finds matches in linear time, but every match was also collected for data.matched at ~9 µs each: a
    regex keyword `a` over a 1 MB run of "a" (the source's default frame limit) held the stage for 9 s."""
    import time

    spec = {"rules": [{"name": "r", "keywords": ["a", r"x\d"], "match": "regex"}]}
    stage = Rules(RulesOptions.model_validate(spec), make_context())
    text = "x1 x2 " + "a" * 1_000_000 + " x3"
    started = time.perf_counter()
    out = stage.process([{"channel": "transcript", "rtstream_id": "r", "data": {"text": text, "start": 1}}])
    assert time.perf_counter() - started < 1.0
    assert [a["data"]["matched"] for a in out if a.get("origin") == "rules"] == [["x1", "x2", "a"]]


def test_a_rule_on_no_channel_is_an_error(tmp_path: Path) -> None:
    """`channels: []` validated and ran a rule that could never fire: a silent no-op config."""
    p = _write(tmp_path, "      - {name: a, keywords: [code], channels: []}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    [line] = str(info.value).splitlines()
    assert line.endswith("stages[0].rules[0].channels: expected at least 1 item"), line


@pytest.mark.parametrize("window", ["0", "0s", "0.4ms"])
def test_a_window_shorter_than_a_millisecond_is_an_error(tmp_path: Path, window: str) -> None:
    """Event times are milliseconds: `window: 0` (or under 1ms) became no window at all, and the rule fired on
    every single match, min_count: 3 notwithstanding."""
    p = _write(tmp_path, f"      - {{name: a, keywords: [code], window: {window}, min_count: 3}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    [line] = str(info.value).splitlines()
    assert "stages[0].rules[0].window: a window is at least 1ms" in line, line
