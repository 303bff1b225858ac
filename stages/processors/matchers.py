"""Keyword matchers whose cost does not grow with the number of keywords.

The rules stage builds one matcher per channel over the keywords of all its
rules, so a text is scanned once however many rules there are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Final

import ahocorasick

_WORD: Final = re.compile(r"\w+")

Hits = dict[int, list[str]]  # rule index -> keywords (as configured) that matched


def _add(hits: Hits, owners: list[tuple[int, str]]) -> None:
    for rule, keyword in owners:
        found = hits.get(rule)
        if found is None:
            hits[rule] = [keyword]
        elif keyword not in found:
            found.append(keyword)


class WordMatcher:
    """Whole-word, case-insensitive: a keyword matches when its words appear in a row.

    Single words are a set intersection with the text's words (done in C);
    phrases are checked only when their first word is present.
    """

    def __init__(self) -> None:
        self._single: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self._phrases: dict[str, list[tuple[str, list[tuple[int, str]]]]] = defaultdict(list)
        self._phrase_owner: dict[str, list[tuple[int, str]]] = {}

    def add(self, rule: int, keyword: str) -> None:
        words = _WORD.findall(keyword.lower())
        if not words:
            raise ValueError(f"keyword {keyword!r} has no word characters (use match: substring)")
        if len(words) == 1:
            self._single[words[0]].append((rule, keyword))
            return
        phrase = " " + " ".join(words) + " "
        owners = self._phrase_owner.get(phrase)
        if owners is None:
            owners = self._phrase_owner[phrase] = []
            self._phrases[words[0]].append((phrase, owners))
        owners.append((rule, keyword))

    def freeze(self) -> None:
        self._single_keys = frozenset(self._single)
        self._phrase_keys = frozenset(self._phrases)

    def match(self, lowered: str, hits: Hits) -> None:
        words = _WORD.findall(lowered)
        if not words:
            return
        present = self._single_keys.intersection(words)
        for w in present:
            _add(hits, self._single[w])
        if self._phrase_keys:
            starts = self._phrase_keys.intersection(words)
            if starts:
                joined = " " + " ".join(words) + " "
                for w in starts:
                    for phrase, owners in self._phrases[w]:
                        if phrase in joined:
                            _add(hits, owners)


class SubstringMatcher:
    """Case-insensitive substrings, all at once with an Aho-Corasick automaton."""

    def __init__(self) -> None:
        self._owners: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self._auto = ahocorasick.Automaton()

    def add(self, rule: int, keyword: str) -> None:
        if not keyword:
            raise ValueError("empty keyword")
        self._owners[keyword.lower()].append((rule, keyword))

    def freeze(self) -> None:
        for key, owners in self._owners.items():
            self._auto.add_word(key, owners)
        if self._owners:
            self._auto.make_automaton()

    def match(self, lowered: str, hits: Hits) -> None:
        if not self._owners:
            return
        seen: set[int] = set()
        for _end, owners in self._auto.iter(lowered):
            if id(owners) not in seen:
                seen.add(id(owners))
                _add(hits, owners)


class RegexMatcher:
    """Regex keywords: one compiled alternation per rule (compiled once, case-insensitive)."""

    def __init__(self) -> None:
        self._parts: dict[int, list[str]] = defaultdict(list)
        self._compiled: list[tuple[int, re.Pattern[str]]] = []

    def add(self, rule: int, keyword: str) -> None:
        try:
            re.compile(keyword)
        except re.error as exc:
            raise ValueError(f"invalid regex {keyword!r}: {exc}") from None
        self._parts[rule].append(keyword)

    def freeze(self) -> None:
        self._compiled = [(rule, re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE))
                          for rule, parts in self._parts.items()]

    def match(self, text: str, hits: Hits) -> None:
        for rule, rx in self._compiled:
            found = [m.group(0) for m in rx.finditer(text)]
            if found:
                hits[rule] = list(dict.fromkeys(found))
