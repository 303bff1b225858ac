"""Option types shared by stages: durations, rates and secrets."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr, WithJsonSchema

from pipeline import secrets

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`30s`, `5m`, `1.5h`, `250ms` or a number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a duration like 30s, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 30s, got {value!r}")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(ms|s|sec|m|min|h|hour|d|day)\s*$")
_RATE_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(value: Any) -> tuple[float, float]:
    """`10/min`, `5/s`, `100/1h` -> (count, per_seconds)."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if m and float(m.group(1)) > 0:
            mult = int(m.group(2)) if m.group(2) else 1
            return float(m.group(1)), mult * _RATE_UNITS[m.group(3)]
    raise ValueError(f"expected a rate like 10/min, got {value!r}")


def _secret(value: Any) -> Any:
    if isinstance(value, str) and value:
        secrets.register(value)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema({
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION.pattern}],
    "description": "a duration: 30s, 5m, 1.5h, 250ms or seconds"})]
"""Seconds, written in config as `30s`, `5m`, `1h`, `250ms` or a plain number."""

Rate = Annotated[tuple[float, float], BeforeValidator(parse_rate), WithJsonSchema({
    "type": "string", "pattern": _RATE.pattern, "description": "a rate: 10/min, 5/s, 100/1h"})]
"""(count, per seconds), written as `10/min`."""

Secret = Annotated[SecretStr, BeforeValidator(_secret)]
"""A string never shown in logs, errors or summaries (registered for masking)."""
