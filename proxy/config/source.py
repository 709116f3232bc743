"""Load YAML into plain values while remembering the line of every path.

PyYAML's normal loaders forget where a value came from and silently let a duplicate key
win.  Here we compose the node tree, build dicts/lists/scalars ourselves, and keep a map
``"routes[0].rings[2].pool" -> line`` so config errors can point at the line.  ``${VAR}``
and ``${VAR:-default}`` in string scalars are replaced from the environment (that is how
secrets get in without living in the file); ``$$`` is a literal ``$``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy.errors import ConfigIssue

# libyaml's C parser (when PyYAML was built with it) is ~4x faster and keeps the same node
# marks (lines) we report, but holds the GIL for the whole parse (~40 ms for a 100 KiB
# file).  A live reload parses in a worker thread with the pure-Python parser instead,
# which lets the event loop run every few ms: slower to finish, no stall on the requests.
_FAST: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_GENTLE: Any = yaml.SafeLoader

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(slots=True)
class Loaded:
    data: Any
    lines: dict[str, int] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)
    env_paths: set[str] = field(default_factory=set)  # values that came from ${VAR}


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def load_yaml(text: str, environ: Mapping[str, str], fast: bool = True) -> Loaded:
    """Parse ``text``; syntax errors and duplicate keys land in ``issues``, never raise.

    ``fast=False`` uses the pure-Python parser, for parsing beside a running event loop.
    """
    out = Loaded(data=None)
    try:
        node = yaml.compose(text, Loader=_FAST if fast else _GENTLE)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        out.issues.append(ConfigIssue("", f"YAML syntax error: {problem}", line))
        return out
    if node is None:
        out.issues.append(ConfigIssue("", "the file is empty", 1))
        return out
    builder = _Builder(environ, out)
    try:
        out.data = builder.build(node, "")
    except yaml.YAMLError as exc:  # e.g. a bad timestamp scalar
        out.issues.append(ConfigIssue("", f"YAML error: {exc}", None))
    return out


class _Builder:
    def __init__(self, environ: Mapping[str, str], out: Loaded) -> None:
        self.environ = environ
        self.out = out
        self.constructor = yaml.SafeLoader("")  # used only to turn scalar nodes into values

    def build(self, node: yaml.Node, path: str) -> Any:
        self.out.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    key = str(key)
                sub = join(path, key)
                if key in result:
                    self.out.issues.append(
                        ConfigIssue(sub, "duplicate key", key_node.start_mark.line + 1)
                    )
                self.out.lines[sub] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, sub)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, join(path, i)) for i, item in enumerate(node.value)]
        value = self.constructor.construct_object(node, deep=True)
        if isinstance(value, str) and "$" in value:
            value = self._expand(value, path, node.start_mark.line + 1)
        return value

    def _expand(self, value: str, path: str, line: int) -> str:
        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = self.environ.get(name)
            if got is not None:
                self.out.env_paths.add(path)
            if got is None:
                if default is not None:
                    return default
                self.out.issues.append(
                    ConfigIssue(path, f"environment variable {name} is not set", line)
                )
                return ""
            return got

        return _ENV_RE.sub(repl, value)
