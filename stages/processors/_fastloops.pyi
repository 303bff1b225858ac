"""Types of the filter and enrich stages' C loops (stages/processors/_fastloops.c)."""

from collections.abc import Callable
from typing import Any

def filter(
    batch: list[dict[str, Any]], names: frozenset[str] | None, final_only: bool,
    keep: Callable[[dict[str, Any]], bool],
) -> list[dict[str, Any]]: ...
def enrich(
    batch: list[dict[str, Any]], streams: dict[str, Any], now: int, stale: int, add_session: bool,
    add_streams: bool, parse_json: bool, one: Callable[[dict[str, Any]], None],
    json: Callable[[dict[str, Any]], None],
) -> None: ...
