"""Option types shared by stages: durations, rates, byte sizes and secrets."""

from __future__ import annotations

import math
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
    seconds = None
    if isinstance(value, int | float):
        try:
            seconds = float(value) if value >= 0 else None  # (NaN is not >= 0)
        except OverflowError:  # an int past a float's range
            seconds = None
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    # .inf (or digits past a float's range) would pass here and crash the stage that turns it into ms
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    return seconds


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(ms|s|sec|m|min|h|hour|d|day)\s*$")
_RATE_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(value: Any) -> tuple[float, float]:
    """`10/min`, `5/s`, `100/1h` -> (count, per_seconds)."""
    if isinstance(value, str):
        m = _RATE.match(value)
        mult = int(m.group(2)) if m and m.group(2) else 1
        if m and float(m.group(1)) > 0 and mult > 0:  # `10/0s` would divide by zero in the token bucket
            return float(m.group(1)), mult * _RATE_UNITS[m.group(3)]
    raise ValueError(f"expected a rate like 10/min, got {value!r}")


_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 10**6, "mb": 10**6,
               "mi": 1 << 20, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gi": 1 << 30, "gib": 1 << 30,
               "t": 10**12, "tb": 10**12, "ti": 1 << 40, "tib": 1 << 40}


def parse_bytes(value: Any) -> int:
    """`1GiB`, `64MiB`, `500MB`, `4096` -> bytes (int)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _BYTES.match(value)
        if m:
            return int(float(m.group(1)) * _BYTE_UNITS[(m.group(2) or "").lower()])
    raise ValueError(f"expected a size like 64MiB or 1GiB, got {value!r}")


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

ByteSize = Annotated[int, BeforeValidator(parse_bytes), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0},
              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$"}],
    "description": "a size: 64MiB, 1GiB, 500MB or bytes"})]
"""Bytes, written in config as `64MiB`, `1GiB`, `500MB` or a plain number."""

Secret = Annotated[SecretStr, BeforeValidator(_secret)]
"""A string never shown in logs, errors or summaries (registered for masking)."""
