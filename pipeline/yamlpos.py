"""Safe YAML loading that remembers where every key and value came from.

Config errors must point at file:line:column; PyYAML's nodes know their marks,
so we build plain Python objects from the node tree ourselves and keep a
`path -> (line, column)` map beside them. `${VAR}` / `${VAR:-default}` is
interpolated in scalars here, where the line is still known.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from pipeline.errors import ConfigError

Path_ = tuple[str | int, ...]
Positions = dict[Path_, tuple[int, int]]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")


_SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)


def interpolate(value: str, env: Mapping[str, str], where: str, missing: list[str] | None = None) -> str:
    """Replace `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.

    An unset variable without a default is an error, or, when `missing` is a list,
    is recorded there and left in place as the placeholder `${VAR}`.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        val = env.get(name)
        if val is None or (val == "" and default is not None):
            if default is None:
                if missing is not None:
                    if name not in missing:
                        missing.append(name)
                    return m.group(0)
                hint = ("export it, or check the file without it: pipeline validate --offline"
                        if _SECRETISH.search(name) else f"export it, or give a default: ${{{name}:-value}}")
                raise ConfigError(f"{where}: environment variable {name} is not set ({hint})")
            return default
        return val

    return _VAR.sub(sub, value)


class _Builder:
    def __init__(self, source: str, filename: str, env: Mapping[str, str], missing: list[str] | None = None) -> None:
        self.missing = missing
        self.loader = yaml.SafeLoader(source)
        self.filename = filename
        self.env = env
        self.positions: Positions = {}

    def where(self, node: yaml.Node) -> str:
        return f"{self.filename}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def build(self) -> Any:
        try:
            node = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f"{self.filename}:{mark.line + 1}:{mark.column + 1}" if mark else self.filename
            raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.filename}: invalid YAML: {exc}") from None
        finally:
            self.loader.dispose()
        if node is None:
            return None
        return self.node(node, ())

    def node(self, node: yaml.Node, path: Path_) -> Any:
        self.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str | int | float | bool) or key is None:
                    raise ConfigError(f"{self.where(key_node)}: mapping keys must be plain strings")
                key = str(key)
                if key in out:
                    raise ConfigError(f"{self.where(key_node)}: duplicate key {key!r}")
                self.positions[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = self.node(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.node(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node)

    def scalar(self, node: yaml.Node) -> Any:
        try:
            if isinstance(node, yaml.ScalarNode) and "$" in node.value and node.tag in (
                    "tag:yaml.org,2002:str", "!"):
                value = interpolate(node.value, self.env, self.where(node), self.missing)
                if node.style is None:  # plain scalar: let `${N:-4}` become an int
                    tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))
                    node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark)
                else:
                    return value
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(f"{self.where(node)}: {exc.problem}") from None


def load(source: str, filename: str = "<config>", env: Mapping[str, str] | None = None,
         missing: list[str] | None = None) -> tuple[Any, Positions]:
    """Parse YAML text safely -> (plain data, positions of every key path); see `interpolate` for `missing`."""
    try:
        b = _Builder(source, filename, os.environ if env is None else env, missing)
    except yaml.YAMLError as exc:  # the reader rejects control characters up front
        raise ConfigError(f"{filename}: invalid YAML: {exc}".replace("\n", " ")) from None
    data = b.build()
    return data, b.positions
