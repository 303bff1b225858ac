"""The optimised hot path does exactly what the plain definitions do.

The rules stage scans texts with one Aho-Corasick automaton plus word-boundary
checks and skips regexes whose literal is absent; the filter runs unrolled over
a batch; replay parses whole chunks at once. Each is compared here with the
obvious implementation (token sets, `in`, `re.finditer`, `keep()` per event,
line-by-line parsing).
"""

from __future__ import annotations

import re
import unicodedata

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stages.processors.filter import Filter, FilterOptions
from stages.processors.matchers import (
    Hits,
    RegexMatcher,
    Scanner,
    SubstringMatcher,
    WordMatcher,
    compile_regex,
    fold,
    nfc,
    required_literal,
)
from stages.processors.rules import Rules, RulesOptions
from stages.sources.replay import ReplayOptions, ReplaySource

WORD = re.compile(r"\w+")
# word characters incl. non-ASCII letters, digits, underscore; separators; case variants
ALPHABET = "abcdeABCDE_01 -.,\n\tÉéß\u017fKİ\u0131\U0001f600\u0301\u212b"  # combining acute, Angstrom sign
texts = st.text(alphabet=ALPHABET, max_size=60)
keywords = st.text(alphabet=ALPHABET, min_size=1, max_size=8).filter(lambda k: k.strip() != "")


def low(text: str) -> str:
    """In NFC, then case-folded one character per character, like the rules."""
    return fold(unicodedata.normalize("NFC", text))


def naive_words(text: str, rules: list[list[str]]) -> dict[int, set[str]]:
    """Whole words as `\\w+` tokens of the text in NFC, case-folded."""
    tokens = WORD.findall(low(text))
    joined = " " + " ".join(tokens) + " "
    out: dict[int, set[str]] = {}
    for i, kws in enumerate(rules):
        for k in kws:
            words = WORD.findall(low(k))
            if words and " " + " ".join(words) + " " in joined:
                out.setdefault(i, set()).add(k)
    return out


def as_sets(hits: Hits) -> dict[int, set[str]]:
    return {rule: set(found) for rule, found in hits.items()}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(keywords, min_size=1, max_size=4), min_size=1, max_size=4), st.lists(texts, max_size=6))
def test_word_and_substring_scan_equals_naive(rules: list[list[str]], sample: list[str]) -> None:
    word, sub = WordMatcher(), SubstringMatcher()
    for i, kws in enumerate(rules):
        for k in kws:
            if WORD.findall(low(k)):
                word.add(i, k)
            sub.add(100 + i, k)
    scan = Scanner(word, sub)
    for text in sample:
        hits: Hits = {}
        scan.match(fold(nfc(text)), hits)  # as the rules stage scans a text
        want = {i: kws for i, kws in naive_words(text, [[k for k in r if WORD.findall(low(k))]
                                                         for r in rules]).items()}
        for i, kws in enumerate(rules):
            found = {k for k in kws if low(k) in low(text)}
            if found:
                want[100 + i] = found
        assert as_sets(hits) == want, text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([r"sk-[a-z0-9]{3,}", r"\bAKIA\d+", r"pr\s*#\d+", r"ab|cd", r"x?yz", r"(?i:k)+",
                                 r"\d{2}-\d{2}", r"é\w", "[\u017fs]t"]), min_size=1, max_size=3),
       st.lists(st.text(alphabet="skSK-akiaAKIA0123 pr#PRxyzé_\u017ftT\u212a", max_size=40), max_size=8))
def test_regex_precheck_never_loses_a_match(patterns: list[str], sample: list[str]) -> None:
    m = RegexMatcher()
    for p in patterns:
        m.add(0, p)
    m.freeze()
    rx = compile_regex("|".join(f"(?:{p})" for p in patterns))  # the same engine, never skipped
    for text in sample:
        hits: Hits = {}
        m.match(text, hits, text.lower())
        found = list(dict.fromkeys(x.group(0) for x in rx.finditer(text)))
        assert hits == ({0: found} if found else {}), text


def test_required_literal_is_conservative() -> None:
    assert required_literal(r"\bsk-[A-Za-z0-9]{16,}") == "sk-"
    assert required_literal(r"PR\s*#\d+") == "pr"
    assert required_literal(r"ab|cd") is None
    assert required_literal(r"(abc)") is None
    assert required_literal(r"x?yz") == "yz"
    assert required_literal(r"é") is None  # non-ASCII literals are never used


def test_non_ascii_case_folds_still_match() -> None:
    m = RegexMatcher()
    m.add(0, r"sk-[a-z0-9]{3,}")
    m.add(0, r"\bAKIA\d+")
    m.freeze()
    for text in ("key \u017fk-abc1 here", "id A\u212aIA42"):  # long s and Kelvin sign fold to s / k
        hits: Hits = {}
        m.match(text, hits, text.lower())
        assert hits, text


events = st.fixed_dictionaries({}, optional={
    "channel": st.sampled_from(["transcript", "visual_index", "scene_index", "audio_index", "alert", 7, None]),
    "event": st.sampled_from(["capture_session.active", "x"]),
    "rtstream_name": st.sampled_from(["display:1", "mic:default", "other", 3]),
    "data": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "is_final": st.sampled_from([True, False, None]), "text": st.one_of(st.text(max_size=6), st.integers())})),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(events, max_size=12), st.sampled_from([None, ["transcript", "capture_session"], ["scene_index"]]),
       st.sampled_from([None, ["display:*"]]), st.booleans(), st.sampled_from([0, 3]))
def test_filter_batch_equals_keep(make_context, batch, channels, names, final_only, min_len) -> None:  # type: ignore[no-untyped-def]
    f = Filter(FilterOptions(channels=channels, rtstream_names=names, final_only=final_only,
                             min_text_length=min_len), make_context())
    assert f.process(batch) == [e for e in batch if f.keep(e)]


async def test_replay_chunks_reject_and_keep_like_line_by_line(make_context, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = [{"channel": "transcript", "data": {"text": f"t{i}"}, "unix_ts": 1.0 + i, "ts": "x"} for i in range(5)]
    lines = [orjson.dumps(good[0]), b"", b"[1, 2]", orjson.dumps(good[1]), b"{not json", orjson.dumps(good[2]),
             b"  ", orjson.dumps({"channel": "alert"}), orjson.dumps(good[3]), b'{"channel": "trans']
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line is truncated (no newline)
    ctx = make_context()
    src = ReplaySource(ReplayOptions(path=str(path), batch_size=3), ctx)
    got = [e for b in [b async for b in src.batches()] for e in b]
    assert [e.get("data", {}).get("text") for e in got] == ["t0", "t1", "t2", None, "t3"]
    assert got[3]["unix_ts"] > 1e9 and "ts" in got[3]  # stamped on read; the others keep their stamps
    dead = [orjson.loads(x) for x in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()]
    assert [(d["origin"]["line"], d["reason"].split(":")[0]) for d in dead] == [
        (3, "JSON list, not an object"), (5, "not JSON"), (10, "truncated last line")]
    assert src.lines == 10


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([r"sk-[a-z0-9]{3,}", r"\bAKIA\d+", r"pr\s*#\d+", r"ab|cd", r"x?yz"]),
                min_size=1, max_size=3),
       st.lists(st.text(alphabet="skSK-akiaAKIA0123 pr#PRxyzabcdé\u017f\u212a", max_size=30), min_size=1, max_size=6))
@example([r"sk-[a-z0-9]{3,}"], ["\u017fk-abc"]).via("long s folds to s: no ASCII literal, regex must still run")
@example([r"\bAKIA\d+"], ["A\u212aIA42"]).via("Kelvin sign folds to k")
def test_rules_skip_regex_only_when_no_literal_occurs(make_context, patterns, sample) -> None:  # type: ignore[no-untyped-def]
    spec = {"rules": [{"name": "w", "keywords": ["ab", "pr"]}, {"name": "s", "keywords": ["k-"], "match": "substring"},
                      {"name": "x", "keywords": patterns, "match": "regex"}]}
    gated = Rules(RulesOptions.model_validate(spec), make_context())
    plain = Rules(RulesOptions.model_validate(spec), make_context())
    plain._scanners = {ch: (scan, rx, False) for ch, (scan, rx, _) in plain._scanners.items()}
    batch = [{"channel": "visual_index", "rtstream_id": "r", "data": {"text": t, "start": i * 10**9}}
             for i, t in enumerate(sample)]
    assert gated.process([dict(e) for e in batch]) == plain.process([dict(e) for e in batch])
