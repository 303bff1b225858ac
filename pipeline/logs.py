"""Log output: readable text (default) or JSON lines for log shippers, secrets masked in both."""

from __future__ import annotations

import argparse
import logging
import os
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline import secrets
from pipeline.termsafe import visible_lines

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"fields", "message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus `fields` and any `extra=` values."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        for key, value in record.__dict__.items():
            if key not in _SKIP and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return secrets.mask(orjson.dumps(out, default=str).decode())


class TextFormatter(secrets.MaskingFormatter):
    """Readable lines, secrets masked; control characters (a peer's terminal escape sequences: a WebSocket close
    reason, a connection id) shown as `\\x1b`, tabs and newlines kept."""

    def format(self, record: logging.LogRecord) -> str:
        return visible_lines(super().format(record))


class StageLog(logging.LoggerAdapter[logging.Logger]):
    """A stage's logger: each record carries `stage` (its label, e.g. `sinks[1]:jsonl`), a field in JSON logs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def stage_log(kind: str, type_name: str, label: str) -> StageLog:
    """The logger `pipeline.<kind>.<type>` (one per stage type, for levels) with this stage's label."""
    return StageLog(logging.getLogger(f"pipeline.{kind}.{type_name}"), {"stage": label})


def formatter(fmt: str) -> logging.Formatter:
    """`text` or `json`; anything else is a user error (argparse already restricts the choice)."""
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter(TEXT_FORMAT, "%H:%M:%S")


def log_options(p: argparse.ArgumentParser, default: Any) -> None:
    """--log-level/--log-format on a command's parser; `default` True: $PIPELINE_LOG_LEVEL/$PIPELINE_LOG_FORMAT,
    else info and text (`pipeline` takes them before or after its subcommand)."""
    env = default is True
    p.add_argument("--log-level", default=os.environ.get("PIPELINE_LOG_LEVEL", "info") if env else default,
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=os.environ.get("PIPELINE_LOG_FORMAT", "text") if env else default,
                   choices=["text", "json"], help="text (default) or JSON lines")
