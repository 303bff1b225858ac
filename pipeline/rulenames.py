"""Config check: every rule name of a pipeline's `rules` stages is its own (names key the saved rule state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import _Checker


def check_rule_names(chk: _Checker, data: Mapping[str, Any]) -> None:
    """Record an error for each rule whose name an earlier rule of an enabled `rules` stage already has.

    Why: cooldowns and window counts are saved under "<rule name>|<rtstream>", in maps every rules stage
    shares; two rules of one name would silence each other's alerts and count into each other's windows.
    Read from the raw data, so a stage with other errors is still checked (every error at once).
    """
    stages = data.get("stages")
    if not isinstance(stages, list):
        return
    first: dict[str, str] = {}
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or stage.get("type") != "rules" or stage.get("enabled") is False:
            continue
        rules = stage.get("rules")
        for j, rule in enumerate(rules if isinstance(rules, list) else ()):
            name = rule.get("name") if isinstance(rule, Mapping) else None
            if not isinstance(name, str) or not name:
                continue
            where = first.setdefault(name, f"stages[{i}].rules[{j}]")
            if where != f"stages[{i}].rules[{j}]":
                chk.add(("stages", i, "rules", j, "name"), f"rule name {name!r} is taken by {where}: rule names "
                        "key the saved cooldowns and windows, so each rule needs its own")
