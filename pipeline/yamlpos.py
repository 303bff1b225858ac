"""Safe YAML loading that remembers where every key and value came from.

Config errors must point at file:line:column; PyYAML's nodes know their marks,
so we build plain Python objects from the node tree ourselves and keep a
`path -> (line, column)` map beside them. `${VAR}` / `${VAR:-default}` is
interpolated in scalars here, where the line is still known.

Limits (a config is small; these stop alias bombs and runaway nesting before
they cost memory): at most MAX_NODES values after expanding aliases and merge
keys, MAX_DEPTH levels of nesting, no alias inside itself, and no tag on a
mapping or list (scalar tags other than YAML's own are refused by the safe loader).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from pipeline import secrets
from pipeline.errors import ConfigError

Path_ = tuple[str | int, ...]
Positions = dict[Path_, tuple[int, int]]

MAX_NODES = 100_000
MAX_DEPTH = 64
_PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
_MERGE = "tag:yaml.org,2002:merge"
#: libyaml's parser when PyYAML has it: the same nodes and marks, six times faster on a large file
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)


def interpolate(value: str, env: Mapping[str, str], where: str, missing: list[str] | None = None) -> str:
    """Replace `${VAR}` and `${VAR:-default}` (the default may hold variables too); `$$` is a literal `$`.

    An unset variable without a default is an error, or, when `missing` is a list,
    is recorded there and left in place as the placeholder `${VAR}`. A `${` that is
    not one of these (`${VAR-x}`, `${ VAR }`, unclosed) is an error: left as it was, it
    became part of a path or a URL without a word.
    """
    if "$" not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        j = value.find("$", i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        if value.startswith("$$", j):
            out.append("$")
            i = j + 2
            continue
        if not value.startswith("${", j):
            out.append("$")
            i = j + 1
            continue
        m = _NAME.match(value, j + 2)
        end = m.end() if m else j + 2
        if m and value.startswith("}", end):
            name, default, i = m.group(0), None, end + 1
        elif m and value.startswith(":-", end):
            close = _closing(value, end + 2)
            if close < 0:
                raise _bad_reference(value[j:], where)
            name, default, i = m.group(0), value[end + 2:close], close + 1
        else:
            close = value.find("}", j)
            raise _bad_reference(value[j:close + 1] if close >= 0 else value[j:], where)
        val = env.get(name)
        if val is None or (val == "" and default is not None):
            if default is not None:
                out.append(interpolate(default, env, where, missing))
                continue
            if missing is not None:
                if name not in missing:
                    missing.append(name)
                out.append(f"${{{name}}}")
                continue
            hint = ("export it, or check the file without it: pipeline validate --offline"
                    if _SECRETISH.search(name) else f"export it, or give a default: ${{{name}:-value}}")
            raise ConfigError(f"{where}: environment variable {name} is not set ({hint})")
        if _SECRETISH.search(name):  # masked wherever it ends up: a URL's query, a wrong field's error message
            secrets.register(val, where=f"{where}: ${{{name}}}")
        out.append(val)
    return "".join(out)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BadReference(ConfigError):
    """A `${` that is no variable reference (reported as is, never left in a value)."""


def _bad_reference(text: str, where: str) -> BadReference:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return BadReference(f"{where}: {shown!r} is not a variable reference: write ${{NAME}} or ${{NAME:-default}} "
                        "($$ for a literal $)")


def _whole_reference(raw: str) -> bool:
    """True when `raw` is one `${...}` reference and nothing else (`${N}`, `${N:-${M}}`)."""
    return raw.startswith("${") and _closing(raw, 2) == len(raw) - 1


def _closing(value: str, i: int) -> int:
    """Index of the `}` that closes a default starting at i (nested `${...}` and `$$` skipped), or -1."""
    depth = 0
    n = len(value)
    while i < n:
        if value.startswith("$$", i):
            i += 2
            continue
        if value.startswith("${", i):
            depth += 1
            i += 2
            continue
        if value[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


class _Builder:
    def __init__(self, source: str, filename: str, env: Mapping[str, str], missing: list[str] | None = None) -> None:
        self.missing = missing
        self.defer = False  # True: unset variables are left as `${VAR}` placeholders and their errors in `unset`
        self.unset_paths: set[str] = set()  # key paths of the values with such an error
        self.source = source
        self.unset: list[str] = []
        self.loader = _Loader(source)
        self.filename = filename
        self.env = env
        self.positions: Positions = {}
        self.texts: dict[Path_, str] = {}  # key path -> `${VAR}` text that YAML turned into a number, bool or null
        self.text: str | None = None
        self.typed: dict[Path_, Any] = {}  # key path -> what a quoted "${VAR}" would be unquoted: number, bool, null
        self.quoted: str | None = None
        self.nodes = 0
        self._open: set[int] = set()  # ids of the collections being built: an alias to one is recursive

    def where(self, node: yaml.Node) -> str:
        return f"{self.filename}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def build(self) -> Any:
        try:
            node = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f"{self.filename}:{mark.line + 1}:{mark.column + 1}" if mark else self.filename
            raise ConfigError(f"{where}: invalid YAML: {exc.problem}{_flow_hint(self.source, mark)}") from None
        except yaml.reader.ReaderError as exc:
            raise _reader_error(exc, self.source, self.filename) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.filename}: invalid YAML: {exc}".replace("\n", " ")) from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ConfigError(f"{self.filename}: invalid YAML: nested too deeply "
                              f"(at most {MAX_DEPTH} levels)") from None
        finally:
            self.loader.dispose()
        if node is None:
            return None
        self._merged_sizes(node)
        data = self.node(node, ())
        if self.unset and not self.defer:
            raise ConfigError("\n".join(self.unset))
        return data

    def _merged_sizes(self, root: yaml.Node) -> None:
        """Refuse merge keys (`<<: *a`) that would expand past MAX_NODES, before PyYAML expands them.

        Each mapping's size after merging = its own pairs + the sizes of what it merges; computed once
        per node (iteratively), so a bomb is measured in linear time and never built.
        """
        size: dict[int, int] = {}
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        active: set[int] = set()
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                active.discard(key)
                total = 1
                for child in self._children(node):
                    total += size.get(id(child), 1)
                size[key] = total
                if total > MAX_NODES:
                    raise ConfigError(f"{self.where(node)}: more than {MAX_NODES} values once aliases and "
                                      "merge keys are expanded (an alias bomb?)")
                continue
            if key in size:
                continue
            if key in active:
                raise ConfigError(f"{self.where(node)}: an alias refers to a value that contains it")
            if len(active) >= MAX_DEPTH:
                raise ConfigError(f"{self.where(node)}: nested more than {MAX_DEPTH} levels deep")
            active.add(key)
            stack.append((node, True))
            for child in self._children(node):
                if id(child) not in size:
                    stack.append((child, False))

    @staticmethod
    def _children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    def node(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConfigError(f"{self.where(node)}: more than {MAX_NODES} values once aliases are expanded "
                              "(an alias bomb?)")
        if len(path) > MAX_DEPTH:
            raise ConfigError(f"{self.where(node)}: nested more than {MAX_DEPTH} levels deep")
        self.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            self.text = self.quoted = None
            had = len(self.unset)
            value = self.scalar(node, path)
            if len(self.unset) > had:
                self.unset_paths.add(_key_path(path))
            if self.text is not None and not isinstance(value, str):
                self.texts[path] = self.text
            if self.quoted is not None:
                typed = self._plain(self.quoted, node)
                if not isinstance(typed, str):
                    self.typed[path] = typed
            return value
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if node.tag != _PLAIN_TAGS[type(node)]:
                raise ConfigError(f"{self.where(node)}: {_key_path(path)}: tag {node.tag!r} is not allowed "
                                  "(plain YAML only)")
            if id(node) in self._open:
                raise ConfigError(f"{self.where(node)}: an alias refers to a value that contains it")
            self._open.add(id(node))
            try:
                return self._mapping(node, path) if isinstance(node, yaml.MappingNode) else \
                    [self.node(item, (*path, i)) for i, item in enumerate(node.value)]
            finally:
                self._open.discard(id(node))
        return self.scalar(node)

    def _plain(self, value: str, node: yaml.Node) -> Any:
        """`value` as YAML reads it unquoted (`4` an int, `false` a bool); the text itself if that fails."""
        tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))
        try:
            return self.loader.construct_object(yaml.ScalarNode(tag, value, node.start_mark, node.end_mark))
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            return value

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        explicit = sum(1 for k, _ in node.value if k.tag != _MERGE)
        try:
            self.loader.flatten_mapping(node)
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(f"{self.where(node)}: {exc.problem}") from None
        merged = len(node.value) - explicit  # flatten_mapping puts what `<<:` merges first
        out: dict[Any, Any] = {}
        own: set[str] = set()
        for n, (key_node, value_node) in enumerate(node.value):
            key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str | int | float | bool) or key is None:
                raise ConfigError(f"{self.where(key_node)}: {_key_path(path)}: mapping keys must be plain strings")
            key = str(key)
            if n >= merged:  # a key written here may override a merged one (YAML's merge keys), not repeat itself
                if key in own:
                    raise ConfigError(f"{self.where(key_node)}: {_key_path((*path, key))}: duplicate key (written "
                                      "twice in one mapping)")
                own.add(key)
            elif key in out:
                out.pop(key)  # merged twice (`<<: [*a, *b]`): the later one, as PyYAML builds it
            self.positions[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.node(value_node, (*path, key))
        return out

    def scalar(self, node: yaml.Node, path: Path_ | None = None) -> Any:
        """A scalar's value (`${VAR}`s replaced); `path`: its key path, for errors (None for a mapping key)."""
        try:
            if isinstance(node, yaml.ScalarNode) and "$" in node.value and node.tag in (
                    "tag:yaml.org,2002:str", "!"):
                try:
                    value = interpolate(node.value, self.env, self.where(node), self.missing)
                except ConfigError as exc:  # every unset variable is reported, not just the first
                    self.unset.append(str(exc))
                    try:
                        value = interpolate(node.value, self.env, self.where(node), [])
                    except BadReference:
                        value = node.value
                if not node.style:  # plain scalar (None, or "" from libyaml): let `${N:-4}` become an int
                    tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))
                    node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark)
                    self.text = value  # a string option takes this text back (see `load`)
                else:
                    if _whole_reference(node.value):  # `{enabled: "${ON:-false}"}`: flow mappings need the quotes
                        self.quoted = value
                    return value
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            at = f"{_key_path(path)}: " if path is not None else ""
            why = (f"tag {node.tag!r} is not allowed (plain YAML only)"
                   if "could not determine a constructor" in str(exc.problem) else exc.problem)
            raise ConfigError(f"{self.where(node)}: {at}{why}") from None
        except (ValueError, TypeError, OverflowError):  # `!!int abc`, `!!timestamp 2020-13-45`: the constructor's own
            at = f"{_key_path(path)}: " if path is not None else ""
            raise ConfigError(f"{self.where(node)}: {at}{getattr(node, 'value', '')!r} is not a valid "
                              f"{str(node.tag).rpartition(':')[2]}") from None


def _key_path(path: Path_) -> str:
    """`stages[2].rules[0].cooldown` (as config errors write it; odd keys quoted so a message stays one line)."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not re.fullmatch(r"[\w-]+", p):
            out += f"[{p!r}]"
        else:
            out += f".{p}" if out else p
    return out or "<top>"


_FLOW_VAR = re.compile(r"[\[{,]\s*(?:[^\s,:]+:\s*)?(\$\{[^}]*\})")


def _flow_hint(source: str, mark: Any) -> str:
    """`{path: ${P}}` is not valid YAML (`{` opens a mapping inside the flow mapping): say to quote it."""
    if mark is None:
        return ""
    lines = source.splitlines()
    line = lines[mark.line] if 0 <= mark.line < len(lines) else ""
    m = _FLOW_VAR.search(line)
    return f" (inside [...] or {{...}} quote a variable: \"{m.group(1)}\")" if m else ""


def _reader_error(exc: yaml.reader.ReaderError, source: str, filename: str) -> ConfigError:
    """A character YAML does not allow (a control character): one line, with its line and column."""
    pos = max(0, min(exc.position, len(source)))
    line = source.count("\n", 0, pos) + 1
    col = pos - (source.rfind("\n", 0, pos) + 1) + 1
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return ConfigError(f"{filename}:{line}:{col}: invalid YAML: control character {ord(char):#06x} is not allowed "
                       "(YAML files are text: tabs, newlines and printable characters)")


_BRACKET = re.compile(r"[\[\]{}]")


def _check_flow_depth(source: str, filename: str) -> None:
    """Refuse `[[[[...` / `{{{{...` nesting before PyYAML, whose scanner slows quadratically with it.

    Brackets inside quoted strings count too; only text nesting past 3 x MAX_DEPTH is refused here
    (the builder reports real nesting past MAX_DEPTH with its line).
    """
    depth = 0
    for m in _BRACKET.finditer(source):
        depth = depth + 1 if m.group(0) in "[{" else max(0, depth - 1)
        if depth > 3 * MAX_DEPTH:
            line = source.count("\n", 0, m.start()) + 1
            raise ConfigError(f"{filename}:{line}: invalid YAML: nested too deeply (at most {MAX_DEPTH} levels)")


def load(source: str, filename: str = "<config>", env: Mapping[str, str] | None = None,
         missing: list[str] | None = None, texts: dict[Path_, str] | None = None,
         unset: list[str] | None = None, unset_paths: set[str] | None = None,
         typed: dict[Path_, Any] | None = None) -> tuple[Any, Positions]:
    """Parse YAML text safely -> (plain data, positions of every key path); see `interpolate` for `missing`.

    `texts`: filled with the interpolated text of each unquoted `${VAR}` that YAML read as a number, a
    boolean or null (`collection_id: ${COLL}` with COLL=42), so that a string option can take the text back.
    `typed`: the other way round, what each quoted `"${VAR}"` (a flow mapping needs the quotes) would be unquoted,
    where that is a number, a boolean or null, so that such an option can take that value.
    `unset`: given, an unset variable (or a malformed `${...}`) does not raise: its error line goes here and the
    value keeps `${VAR}`, so the caller can check the rest of the file and report everything at once;
    `unset_paths` gets the key paths (`sinks[0].url`) of those values.
    """
    _check_flow_depth(source, filename)
    try:
        b = _Builder(source, filename, os.environ if env is None else env, missing)
    except yaml.reader.ReaderError as exc:  # the reader rejects control characters up front
        raise _reader_error(exc, source, filename) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: invalid YAML: {exc}".replace("\n", " ")) from None
    b.defer = unset is not None
    data = b.build()
    if unset is not None:
        unset.extend(b.unset)
    if unset_paths is not None:
        unset_paths.update(b.unset_paths)
    if texts is not None:
        texts.update(b.texts)
    if typed is not None:
        typed.update(b.typed)
    return data, b.positions
