"""JSON Schema for pipeline files, built from the stages' own Options classes."""

from __future__ import annotations

from typing import Any

from pipeline.config import RuntimeSettings, VideoDBSettings

_LIST_KEYS = {"processor": "stages", "sink": "sinks"}


def _stage_schema(name: str, cls: Any) -> dict[str, Any]:
    schema = cls.Options.model_json_schema()
    schema.setdefault("properties", {})["type"] = {"const": name}
    schema["required"] = sorted({"type", *schema.get("required", [])})
    schema["title"] = f"{cls.kind} {name}"
    return schema


def json_schema(classes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """A draft 2020-12 schema: one `oneOf` per stage kind, options from each Options class."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for kind, name, cls in classes:
        by_kind.setdefault(kind, []).append(_stage_schema(name, cls))
    props: dict[str, Any] = {
        "name": {"type": "string"},
        "videodb": VideoDBSettings.model_json_schema(),
        "runtime": RuntimeSettings.model_json_schema(),
        "dead_letter": {"type": "string"},
        "source": {"oneOf": by_kind.get("source", [])},
        "controller": {"oneOf": by_kind.get("controller", [])},
        "stages": {"type": "array", "items": {"oneOf": by_kind.get("processor", [])}},
        "sinks": {"type": "array", "minItems": 1, "items": {"oneOf": by_kind.get("sink", [])}},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "videodb-pipeline config",
            "type": "object", "properties": props, "required": ["name", "source", "sinks"],
            "additionalProperties": False}
