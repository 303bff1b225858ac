"""Keyword matchers whose cost does not grow with the number of keywords.

The rules stage builds one matcher per channel over the keywords of all its
rules, so a text is scanned once however many rules there are.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from itertools import islice
from typing import Any, Final

import ahocorasick_rs

_WORD: Final = re.compile(r"\w+")
Owners = list[tuple[int, str]]

Hits = dict[int, list[str]]  # rule index -> keywords (as configured) that matched


FINAL_SIGMA: Final = "\u03c2"  # str.lower() writes this final sigma for a capital sigma at a word's end


def nfc(text: str) -> str:
    """`text` in Unicode NFC ("e" + U+0301 becomes "é"); `text` itself when a quick check finds it is (ASCII is).

    Why: a keyword and a text may spell the same word in different normalization forms (macOS and some OCR
    engines write NFD); both are compared in NFC. Callers skip ASCII texts before calling: they cost nothing.
    """
    # not is_normalized() first: normalize() returns `text` itself after the same quick check, and an NFD text
    # was checked in full and then normalized (1 MB: 44 + 30 ms, against 30)
    return unicodedata.normalize("NFC", text)


def fold(text: str) -> str:
    """`text.lower()`, one character per character: offsets and word boundaries stay those of `text`.

    Why: `"İ".lower()` is "i" + U+0307 (a combining mark, not a word character), so plain
    lowering would make "İpassword" contain the whole word "password". And a capital sigma
    lowers to U+03C3 or, at a word's end, to the final U+03C2: both are U+03C3 here, whatever stands around it.
    """
    lowered = text.lower()
    if len(lowered) != len(text):  # "İ" (U+0130) is the one character whose lower() is longer than it
        lowered = text.replace("\u0130", "i").lower()
    return lowered.replace(FINAL_SIGMA, "\u03c3") if FINAL_SIGMA in lowered else lowered


def _add(hits: Hits, owners: Owners) -> None:
    for rule, keyword in owners:
        found = hits.get(rule)
        if found is None:
            hits[rule] = [keyword]
        elif keyword not in found:
            found.append(keyword)


class WordMatcher:
    """Whole-word, case-insensitive: a keyword matches when its words appear in a row.

    A single word matches where it occurs with no word character on either side
    (exactly the text's `\\w+` tokens); a phrase is checked against the joined
    tokens only when its first word occurs that way.
    """

    def __init__(self) -> None:
        self._single: dict[str, Owners] = defaultdict(list)
        # first word -> [(the other words, each after a run of non-word characters), owners]
        self._phrases: dict[str, list[tuple[re.Pattern[str], Owners]]] = defaultdict(list)
        self._phrase_owner: dict[str, Owners] = {}
        self._phrase_words: dict[str, list[tuple[tuple[str, ...], Owners]]] = defaultdict(list)  # as _phrases

    def add(self, rule: int, keyword: str) -> None:
        words = _WORD.findall(fold(nfc(keyword)))
        if not words:
            raise ValueError(f"keyword {keyword!r} has no word characters (use match: substring)")
        if len(words) == 1:
            self._single[words[0]].append((rule, keyword))
            return
        phrase = " ".join(words)
        owners = self._phrase_owner.get(phrase)
        if owners is None:
            owners = self._phrase_owner[phrase] = []
            rest = re.compile("".join(rf"\W+{re.escape(w)}" for w in words[1:]) + r"(?!\w)")
            self._phrases[words[0]].append((rest, owners))
            self._phrase_words[words[0]].append((tuple(words[1:]), owners))
        owners.append((rule, keyword))

    def words(self) -> dict[str, tuple[tuple[tuple[int, str], ...] | None, tuple[Any, ...]]]:
        """First word -> (its single-word owners or None, ((the phrase's other words), owners) in order):
        the table the native rules engine looks words up in."""
        out: dict[str, tuple[tuple[tuple[int, str], ...] | None, tuple[Any, ...]]] = {}
        for w in (*self._single, *self._phrase_words):
            single = self._single.get(w)
            phrases = tuple((rest, tuple(owners)) for rest, owners in self._phrase_words.get(w, ()))
            out[w] = (tuple(single) if single else None, phrases)
        return out


class SubstringMatcher:
    """Case-insensitive substrings, anywhere in the text."""

    def __init__(self) -> None:
        self._owners: dict[str, Owners] = defaultdict(list)

    def add(self, rule: int, keyword: str) -> None:
        if not keyword:
            raise ValueError("empty keyword")
        self._owners[fold(nfc(keyword))].append((rule, keyword))


class Scanner:
    """Word and substring keywords of one channel in one Aho-Corasick automaton (Rust, ahocorasick-rs).

    Why: one native pass over the lowered text finds every candidate, whatever the
    number of keywords; Python only checks word boundaries of the few hits.
    """

    __slots__ = ("_entries", "_find")

    def __init__(self, word: WordMatcher | None, substring: SubstringMatcher | None,
                 literals: Iterable[str] = ()) -> None:
        # key -> (whole-word owners, phrases starting with this word, substring owners,
        #         whether it is a literal some regex rule needs)
        table: dict[str, list[object]] = {}

        def entry(key: str) -> list[object]:
            found = table.get(key)
            if found is None:
                found = table[key] = [None, None, None, False]
            return found

        for lit in literals:
            entry(lit)[3] = True
        if word is not None:
            for w, owners in word._single.items():
                entry(w)[0] = owners
            for w, phrases in word._phrases.items():
                entry(w)[1] = phrases
        if substring is not None:
            for key, owners in substring._owners.items():
                entry(key)[2] = owners
        keys = list(table)
        self._entries: list[tuple[Any, ...]] = [tuple(table[k]) for k in keys]
        # every occurrence of every key, overlapping, as (key index, start, end) character offsets
        self._find = ahocorasick_rs.AhoCorasick(keys).find_matches_as_indexes if keys else None

    def match(self, lowered: str, hits: Hits) -> bool:
        """Add word and substring hits in `fold(text)`; True when a regex literal (see `literals`) occurs."""
        find = self._find
        if find is None:
            return False
        entries = self._entries
        size = len(lowered)
        literal = False
        try:
            matches = find(lowered, True)
        except UnicodeEncodeError:  # a lone surrogate (only a plugin can make one): "?" in its place, as the
            lowered = lowered.encode("utf-8", "replace").decode()  # same one non-word character
            matches = find(lowered, True)
        done = set()  # keys whose every owner is in `hits` already: a text repeating one ("aaaa" in a long run
        for idx, start, end in matches:  # of "a": one match per character) costs a set lookup per repeat
            if idx in done:
                continue
            words, phrases, subs, is_literal = entries[idx]
            if is_literal:
                literal = True
            if subs is not None:
                _add(hits, subs)
            if words is None and phrases is None:
                done.add(idx)
                continue
            if start:  # a word character before: part of a longer word
                ch = lowered[start - 1]
                if ch.isalnum() or ch == "_":
                    continue
            if phrases is not None:  # the next words must follow, each after non-word characters
                for rest, owners in phrases:
                    if rest.match(lowered, end):
                        _add(hits, owners)
            if words is not None:
                if end < size:
                    ch = lowered[end]
                    if ch.isalnum() or ch == "_":
                        continue
                for rule, keyword in words:  # _add, inlined: this runs for every whole-word hit
                    found = hits.get(rule)
                    if found is None:
                        hits[rule] = [keyword]
                    elif keyword not in found:
                        found.append(keyword)
                if phrases is None:
                    done.add(idx)
        return literal


def required_literal(pattern: str) -> str | None:
    """The longest ASCII literal every match of `pattern` contains (lowered), or None.

    Only top-level literals count (never inside a group, branch or repeat), so
    the answer is always safe to use as a pre-check.
    """
    try:
        from re import _constants, _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern, re.IGNORECASE)
        literal = _constants.LITERAL
    except Exception:
        return None
    best = run = ""
    for op, arg in parsed:
        if op is literal and isinstance(arg, int) and arg < 128:
            run += chr(arg)
            continue
        best = max(best, run, key=len)
        run = ""
    best = max(best, run, key=len)
    return best.lower() or None


def _re2_options() -> Any:
    import re2  # lazy: the CLI starts without it

    opts = re2.Options()
    opts.case_sensitive = False
    opts.log_errors = False  # a rejected pattern is reported once, as a config error
    return opts


def compile_regex(pattern: str) -> Any:
    """Compile with RE2 (linear time: no catastrophic backtracking), case-insensitive; ValueError if RE2 can't."""
    import re2

    try:
        return re2.compile(pattern, _re2_options())
    except re2.error as exc:
        try:
            re.compile(pattern)
        except re.error as bad:
            raise ValueError(f"invalid regex {pattern!r}: {bad}") from None
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"regex {pattern!r} is not supported: {detail} (regexes run on RE2, which "
                         "guarantees linear time: no backreferences or lookaround; \\w, \\d and \\b "
                         "are ASCII-only)") from None


def compile_rule_regex(parts: list[str]) -> Any:
    """A regex rule's keywords as the one RE2 alternation it runs as; ValueError if RE2 can't compile it.

    Why checked as a whole: each keyword can compile alone and their alternation still exceed RE2's size
    limit; the config then validated and the stage failed when it was built (at start, in `pipeline test`, in a
    reload) with a line quoting the whole alternation.
    """
    if len(parts) == 1:
        return compile_regex(parts[0])
    import re2

    try:
        return re2.compile("|".join(f"(?:{p})" for p in parts), _re2_options())
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"its {len(parts)} regex keywords together are not supported: {detail} (a rule's "
                         "regexes run as one RE2 alternation; split them over several rules)") from None


#: data.matched of a regex rule: the distinct matches among this many first occurrences. Each occurrence
#: costs ~9 µs in the RE2 wrapper, so a pattern matching at every character of a 1 MB text took 9 s.
MAX_REGEX_MATCHES: Final = 1000


class RegexMatcher:
    """Regex keywords: one RE2 alternation per rule (compiled once, case-insensitive, linear time).

    A rule whose every pattern contains a literal is skipped without running the
    regex engine when an ASCII text holds none of those literals.
    """

    def __init__(self, shared: dict[tuple[str, ...], tuple[Any, tuple[str, ...] | None]] | None = None) -> None:
        self._parts: dict[int, list[str]] = defaultdict(list)
        self._compiled: list[tuple[int, Any, tuple[str, ...] | None]] = []
        # keywords -> (alternation, literals), shared by the matchers of one stage's channels: a rule on three
        # channels was compiled three times (2,000 regex rules: a reload held the event loop 1.6 s)
        self._shared = {} if shared is None else shared

    def add(self, rule: int, keyword: str, *, checked: bool = False) -> None:
        """Add a keyword of `rule`; ValueError if RE2 cannot compile it (`checked`: the caller knows it can)."""
        keyword = nfc(keyword)  # texts are matched in NFC: a pattern written in NFD would never match one
        if not checked:
            compile_regex(keyword)
        self._parts[rule].append(keyword)

    def freeze(self) -> None:
        self._compiled = []
        for rule, parts in self._parts.items():
            key = tuple(parts)
            done = self._shared.get(key)
            if done is None:
                literals = [lit for lit in map(required_literal, parts) if lit is not None]
                need = tuple(dict.fromkeys(literals)) if len(literals) == len(parts) else None
                done = self._shared[key] = (compile_rule_regex(parts), need)
            self._compiled.append((rule, done[0], done[1]))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def literals(self) -> frozenset[str] | None:
        """Every literal the rules need, when each rule has some (else None: the engine must always run).

        With them in the channel's automaton, an ASCII text in which none occurs skips `match` entirely.
        """
        needs = [need for _, _, need in self._compiled]
        if any(need is None for need in needs):
            return None
        return frozenset(lit for need in needs if need is not None for lit in need)

    def match(self, text: str, hits: Hits, lowered: str | None = None) -> None:
        ascii_text = text.isascii()
        for rule, rx, need in self._compiled:
            if need is not None and ascii_text:
                low = text.lower() if lowered is None else lowered
                for lit in need:
                    if lit in low:
                        break
                else:
                    continue
            try:
                found = [m.group(0) for m in islice(rx.finditer(text), MAX_REGEX_MATCHES)]
            except UnicodeEncodeError:  # a lone surrogate (only a plugin can make one): RE2 reads UTF-8
                safe = text.encode("utf-8", "replace").decode()
                found = [m.group(0) for m in islice(rx.finditer(safe), MAX_REGEX_MATCHES)]
            if found:
                hits[rule] = list(dict.fromkeys(found))
