"""JSON Schema for pipeline files, built from the stages' own Options classes.

Made for editors validating the file as written: every `$ref` points into the
top-level `$defs`, durations and rates are the strings people write (`30s`,
`10/min`), `enabled:` is allowed on every stage, and any scalar may be a
`${VAR}` / `${VAR:-default}` reference (it is checked once interpolated).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from pipeline.config import RuntimeSettings, VideoDBSettings
from pipeline.types import ByteSize

_ENV = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"}
_SCALAR_TYPES = ("number", "integer", "boolean")


def _allow_env(node: Any) -> Any:
    """Recursively let every typed scalar (number, boolean, enum, patterned string) be a `${VAR}`."""
    if isinstance(node, list):
        return [_allow_env(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("const", "enum", "default", "examples") else _allow_env(v)) for k, v in node.items()}
    if "properties" in node:  # property names are not schemas
        out["properties"] = {k: _allow_env(v) for k, v in node["properties"].items()}
    if node.get("type") in _SCALAR_TYPES or "enum" in node or ("pattern" in node and node.get("type") == "string"):
        return {"anyOf": [out, _ENV]}
    return out


def _model_schema(model: Any, prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """The model's schema with its `$defs` moved into `defs` under prefixed names."""
    schema = model.model_json_schema(ref_template=f"#/$defs/{prefix}{{model}}")
    for name, sub in schema.pop("$defs", {}).items():
        defs[f"{prefix}{name}"] = _allow_env(sub)
    return _allow_env(schema)  # type: ignore[no-any-return]


def _stage_schema(name: str, cls: Any, defs: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{cls.kind}.{name}.".replace(":", ".")
    schema = _model_schema(cls.Options, prefix, defs)
    props = schema.setdefault("properties", {})
    props["type"] = {"const": name}
    props["enabled"] = {"anyOf": [{"type": "boolean"}, _ENV], "description": "false: configured but not run"}
    schema["required"] = sorted({"type", *schema.get("required", [])})
    schema["title"] = f"{cls.kind} {name}"
    return schema


def json_schema(classes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """A draft 2020-12 schema: one `oneOf` per stage kind, options from each Options class."""
    defs: dict[str, Any] = {}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for kind, name, cls in classes:
        by_kind.setdefault(kind, []).append(_stage_schema(name, cls, defs))
    props: dict[str, Any] = {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        "videodb": _model_schema(VideoDBSettings, "videodb.", defs),
        "runtime": _model_schema(RuntimeSettings, "runtime.", defs),
        "dead_letter": {"type": "string"},
        "dead_letter_max_bytes": _allow_env({**TypeAdapter(ByteSize).json_schema(), "default": "1GiB",
                                             "description": "the dead-letter file grows to this size at most; "
                                             "rejects past it are counted, not written (at least 1MiB)"}),
        "state_dir": {"type": "string", "description": "what must survive a restart (default out/<name>)"},
        "channels": {"type": "array", "items": {"type": "string"},
                     "description": "extra channel names that plugins emit"},
        "source": {"oneOf": by_kind.get("source", [])},
        "controller": {"oneOf": by_kind.get("controller", [])},
        "stages": {"type": "array", "items": {"oneOf": by_kind.get("processor", [])}},
        "sinks": {"type": "array", "minItems": 1, "items": {"oneOf": by_kind.get("sink", [])}},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "videodb-pipeline config",
            "type": "object", "properties": props, "required": ["name", "source", "sinks"],
            "additionalProperties": False, "$defs": defs}
