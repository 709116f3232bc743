"""Load YAML into plain values while remembering the line of every path.

PyYAML's normal loaders forget where a value came from and silently let a duplicate key
win.  Here we compose the node tree, build dicts/lists/scalars ourselves, and keep a map
``"routes[0].rings[2].pool" -> line`` so config errors can point at the line.  ``${VAR}``
and ``${VAR:-default}`` in string scalars are replaced from the environment (that is how
secrets get in without living in the file); ``$$`` is a literal ``$``.  Merge keys
(``<<: *defaults``) merge as YAML 1.1 says; aliases may expand the document to at most
``MAX_EXPANSION`` times its own size (a "billion laughs" file is an issue, not an hour).
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

# A document of N nodes may expand to max(MAX_EXPANDED, MAX_EXPANSION * N) values through
# its aliases: merge keys reuse a block a few times, never thousands of times.
MAX_EXPANSION = 10
MAX_EXPANDED = 50_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
UNSET_MESSAGE = "environment variable {} is not set"
_UNSET_RE = re.compile(r"^environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set$")

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(slots=True)
class Loaded:
    data: Any
    lines: dict[str, int] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)
    env_paths: set[str] = field(default_factory=set)  # values that came from ${VAR}
    # Every ${VAR} written, by path: (name, whether it has a :-default), set or not.
    env_refs: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    # What ${VAR}s expanded to, never to be quoted in a message (``Ctx.err`` scrubs it).
    expanded: Expanded = field(default_factory=lambda: Expanded())


@dataclass(slots=True)
class Expanded:
    """The values ``${VAR}`` expansion produced: by path (the whole string after
    expansion) and by variable (its value)."""

    values: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)


def unset_variable(issue: ConfigIssue) -> str | None:
    """The variable an issue says is unset (``${VAR}`` or an admin token's ``env``)."""
    m = _UNSET_RE.match(issue.message)
    return m.group(1) if m else None


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
        column = f" at column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        out.issues.append(ConfigIssue("", f"YAML syntax error{column}: {problem}", line))
        return out
    if node is None:
        out.issues.append(ConfigIssue("", "the file is empty", 1))
        return out
    too_big = _expansion_issue(node)
    if too_big is not None:
        out.issues.append(too_big)
        return out
    builder = _Builder(environ, out)
    try:
        out.data = builder.build(node, "")
    except yaml.YAMLError as exc:  # e.g. a bad timestamp scalar
        out.issues.append(ConfigIssue("", f"YAML error: {exc}", None))
    return out


def _expansion_issue(root: yaml.Node) -> ConfigIssue | None:
    """An issue when aliases expand the document too far, or refer to themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise RecursionError(node.start_mark.line + 1)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        expanded = size(root)
    except RecursionError as exc:
        line = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        return ConfigIssue("", "an alias refers to the node that contains it", line)
    limit = max(MAX_EXPANDED, MAX_EXPANSION * len(sizes))
    if expanded > limit:
        return ConfigIssue("", f"aliases expand the document to over {limit} values "
                           f"({len(sizes)} written); expand them by hand if that is meant", 1)
    return None


class _Builder:
    def __init__(self, environ: Mapping[str, str], out: Loaded) -> None:
        self.environ = environ
        self.out = out
        self.constructor = yaml.SafeLoader("")  # used only to turn scalar nodes into values

    def build(self, node: yaml.Node, path: str) -> Any:
        self.out.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            merged: list[tuple[yaml.Node, yaml.Node]] = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    merged.extend(self._merged(value_node, join(path, "<<")))
                    continue
                key = self._key(key_node)
                sub = join(path, key)
                if key in result:
                    self.out.issues.append(
                        ConfigIssue(sub, "duplicate key", key_node.start_mark.line + 1)
                    )
                self.out.lines[sub] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, sub)
            # Merged keys never replace one written in the mapping; of several merged
            # mappings (``<<: [*a, *b]``) the first that has a key wins (YAML 1.1).
            for key_node, value_node in merged:
                key = self._key(key_node)
                if key not in result:
                    sub = join(path, key)
                    self.out.lines[sub] = key_node.start_mark.line + 1
                    result[key] = self.build(value_node, sub)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, join(path, i)) for i, item in enumerate(node.value)]
        value = self.constructor.construct_object(node, deep=True)
        if isinstance(value, str) and "$" in value:
            value = self._expand(value, path, node.start_mark.line + 1)
        return value

    def _key(self, node: yaml.Node) -> str:
        key = self.constructor.construct_object(node, deep=True)
        return key if isinstance(key, str) else str(key)

    def _merged(self, node: yaml.Node, path: str) -> list[tuple[yaml.Node, yaml.Node]]:
        """The pairs a merge key brings: of a mapping, or of a list of mappings in order."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self.out.issues.append(ConfigIssue(
                    path, "a merge key (<<) takes a mapping or a list of mappings",
                    source.start_mark.line + 1))
                continue
            for key_node, value_node in source.value:
                if key_node.tag == _MERGE_TAG:  # a merged mapping's own merges
                    pairs.extend(self._merged(value_node, path))
                else:
                    pairs.append((key_node, value_node))
        return pairs

    def _expand(self, value: str, path: str, line: int) -> str:
        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            self.out.env_refs.setdefault(path, []).append((name, default is not None))
            got = self.environ.get(name)
            if got is not None:
                self.out.env_paths.add(path)
                self.out.expanded.variables[name] = got
            if got is None:
                if default is not None:
                    return default
                self.out.issues.append(ConfigIssue(path, UNSET_MESSAGE.format(name), line))
                return ""
            return got

        expanded = _ENV_RE.sub(repl, value)
        if path in self.out.env_refs:
            self.out.expanded.values[path] = expanded
        return expanded
