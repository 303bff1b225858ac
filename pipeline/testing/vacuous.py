"""A `count: 0` alert expectation must name things that run in its case, or it passes whatever the rules do."""

from __future__ import annotations

import unicodedata
from typing import Any

from pipeline.config import StageSpec
from pipeline.errors import ConfigError, suggest
from pipeline.testing.model import LoadedCase


def keyword_key(keyword: str) -> str:
    """An expected keyword as compared with a rule's: in NFC and lowered, as the rules match ("CAFE" + U+0301
    is "café")."""
    return unicodedata.normalize("NFC", keyword).lower()


def _streams(events: list[dict[str, Any]]) -> list[str]:
    """Every rtstream id and name the input holds (lifecycle events list theirs under data.rtstreams)."""
    out: dict[str, None] = {}

    def take(x: Any) -> None:
        if isinstance(x, dict):
            for k in ("rtstream_id", "rtstream_name", "name"):
                if isinstance(x.get(k), str):
                    out[x[k]] = None

    for e in events:
        take({"rtstream_id": e.get("rtstream_id"), "rtstream_name": e.get("rtstream_name")})
        data = e.get("data")
        for r in (data.get("rtstreams") if isinstance(data, dict) else None) or []:
            take(r)
    return list(out)


def check_zero_counts(specs: list[StageSpec], lc: LoadedCase) -> None:
    """`{rtstream: s2, count: 0}` with s2 on no input event can never fail: an error, as a label no rule has.

    Checked only where nothing else makes alerts (no plugin processor) and, for keywords, no regex rule runs
    (its matches are texts, not keywords)."""
    if any(not s.cls.__module__.startswith("stages.") for s in specs):
        return
    rules = [r for s in specs for r in getattr(s.options, "rules", None) or []]
    keywords = sorted({keyword_key(k) for r in rules if r.match != "regex" for k in r.keywords})
    any_regex = any(r.match == "regex" for r in rules)
    for i, want in enumerate(lc.case.expect.alerts or []):
        if want.count != 0:
            continue  # expecting an alert that cannot come fails by itself
        where = f"{lc.where}: expect.alerts[{i}]"
        streams = _streams(lc.events)
        if want.rtstream is not None and want.rtstream not in streams:
            raise ConfigError(f"{where}.rtstream: no input event is on rtstream {want.rtstream!r}"
                              f"{suggest(want.rtstream, streams)}")
        for kw in [] if any_regex else want.matched or []:
            if keyword_key(kw) not in keywords:
                raise ConfigError(f"{where}.matched: no rule running in this case has the keyword {kw!r}"
                                  f"{suggest(keyword_key(kw), keywords)}")
        labelled = [r for r in rules if want.label in (None, r.name)]
        severities = sorted({r.severity for r in labelled})
        if want.severity is not None and want.severity not in severities:
            raise ConfigError(f"{where}.severity: no rule running in this case has severity {want.severity!r}"
                              f"{suggest(want.severity, severities)}")


def check_alerts_can_come(specs: list[StageSpec], lc: LoadedCase) -> None:
    """`no_alerts: true`, `only_these_alerts: true` or a `count: 0` alert where no rule (and no plugin processor)
    runs can never fail: nothing there makes alerts. An error, as a label no rule has."""
    if any(not s.cls.__module__.startswith("stages.") for s in specs):
        return
    if any(getattr(s.options, "rules", None) for s in specs):
        return
    ex = lc.case.expect
    which = f"stages: {', '.join(lc.case.stages)}" if lc.case.stages else "its config has no rules stage"
    why = f"no rule runs in this case ({which}), so no alert can come and this passes whatever the rules do"
    for key, vacuous in (("no_alerts", ex.no_alerts), ("only_these_alerts", ex.only_these_alerts)):
        if vacuous:
            raise ConfigError(f"{lc.where}: expect.{key}: {why}")
    for i, want in enumerate(ex.alerts or []):
        if want.count == 0:
            raise ConfigError(f"{lc.where}: expect.alerts[{i}]: {why}")
