"""Relative paths in a config: files it reads resolve against the config file's directory.

An option is an input file when its Field carries `json_schema_extra={"path": "input"}`;
`{"path": "output"}` marks files the pipeline writes (those stay relative to the
working directory, where `out/` is). `validate` uses both marks for its file checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

Role = Literal["input", "output"]


def _role(model: BaseModel, name: str) -> str | None:
    extra = type(model).model_fields[name].json_schema_extra
    return extra.get("path") if isinstance(extra, dict) and isinstance(extra.get("path"), str) else None  # type: ignore[return-value]


def resolve_inputs(model: Any, base: Path) -> Any:
    """A copy of an options model whose relative input paths are joined to `base` (nested models too)."""
    if not isinstance(model, BaseModel):
        return model
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, str) and _role(model, name) == "input":
            if value and not value.startswith("~") and not Path(value).is_absolute():
                update[name] = str(base / value)
        elif isinstance(value, BaseModel):
            new = resolve_inputs(value, base)
            if new is not value:
                update[name] = new
    return model.model_copy(update=update) if update else model


def file_options(model: Any, role: Role, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(option path, value) of every set path option with the given role."""
    if not isinstance(model, BaseModel):
        return
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, str) and _role(model, name) == role:
            yield f"{prefix}{name}", value
        elif isinstance(value, BaseModel):
            yield from file_options(value, role, f"{prefix}{name}.")
