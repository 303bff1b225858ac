"""Types of the rules stage's C engine (stages/processors/_fastrules.c)."""

from collections.abc import Callable
from typing import Any

class Engine:
    """Whole-word rules over a batch: scan, cooldowns, alerts (rules.py's Python path is the reference)."""

    def __init__(
        self,
        tables: list[tuple[dict[str, tuple[Any, tuple[Any, ...]]], str]],
        channel_map: dict[str, int],
        rules: list[tuple[str, str, str, int, Callable[[str], bool] | None]],
        fold: Callable[[str], str],
        nfc: Callable[[str], str],
        event_time_ms: Callable[[dict[str, Any]], int],
        stream_of: Callable[[dict[str, Any]], str],
        cooled: Callable[[Any, Any, int], bool],
        source_of: Callable[[Any], str],
    ) -> None: ...
    def process(
        self, batch: list[dict[str, Any]], last_fired: dict[str, Any], changed: set[Any] | None, watermark: Any,
        ceiling: Any, counts: list[int],
    ) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]], Any]: ...
