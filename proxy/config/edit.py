"""Editing the config file's rings and pools while keeping the file as people wrote it.

``Document(text)`` reads a config file with ruamel.yaml's round-trip loader, which keeps
comments, key order, quoting, flow or block style and blank lines; the edits below change
only the ring or pool they name, and ``dump()`` writes everything else back as it was.
Pure: text in, text out.  The admin API (``proxy.admin.configfile``) does the I/O: it
validates the result with the same loader a reload uses, writes it atomically and reloads.

What the edits take care of, beyond setting values:

* The file's indentation is guessed (``guess_indent``) so a new ring looks like its
  neighbours.
* Comment lines and blank lines that follow an item belong, in ruamel's model, to that
  item's last value.  An edit that appends, replaces or deletes an item moves them along, so
  the comment above the next ring or the blank line before ``routes:`` stays where it was.
* New strings that YAML 1.1 (PyYAML, what the proxy loads with) would read as something
  else (``yes``, ``on``, ``1.5``, ``2026-01-01``) are quoted.
* A node other places refer to (an ``&anchor``) is never changed in place: that would
  change every ``*alias`` too.  A value taken from a merge key (``<<: *defaults``) that the
  edit cannot express is refused with a message (422), never silently kept.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import io
import itertools
from collections.abc import Callable, Mapping
from typing import Any, cast

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from proxy.config.values import NAME_RE
from proxy.errors import ApiError

Spec = dict[str, Any]  # a ring or pool as plain JSON values
_Node = CommentedMap | CommentedSeq
# PyYAML's own implicit resolver (YAML 1.1): what the proxy would read a plain scalar as.
_RESOLVE = cast(Callable[[type, str, tuple[bool, bool]], str],
                yaml.resolver.Resolver().resolve)


def revision(data: bytes) -> str:
    """The file's revision: the hash ``proxy.config.load`` gives the config it holds."""
    return hashlib.sha256(data).hexdigest()[:12]


def file_diff(old: str, new: str, name: str) -> str:
    """A unified diff of two versions of the file (the audit trail's record of a change)."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"a/{name}", f"b/{name}", n=2))


def guess_indent(text: str) -> tuple[int, int]:
    """(mapping indent, the dash's offset inside a block sequence) the file mostly uses."""
    maps: collections.Counter[int] = collections.Counter()
    offsets: collections.Counter[int] = collections.Counter()
    lines = [line for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    for above, below in itertools.pairwise(lines):
        if not above.split(" #")[0].rstrip().endswith(":"):
            continue
        outer = len(above) - len(above.lstrip())
        if above.lstrip().startswith("- "):
            outer += 2
        inner = len(below) - len(below.lstrip())
        if below.lstrip().startswith("- ") and inner >= outer:
            offsets[inner - outer] += 1
        elif inner > outer:
            maps[inner - outer] += 1
    mapping = maps.most_common(1)[0][0] if maps else 2
    offset = offsets.most_common(1)[0][0] if offsets else 0
    return mapping, offset


def plain(value: Any) -> Any:
    """A node as plain JSON values (merged keys included, as the loader sees them)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)  # dates and the like: as text


def _spec(node: Any) -> Spec:
    value = plain(node)
    return value if isinstance(value, dict) else {"value": value}


class Document:
    """One config file, parsed for round-trip editing."""

    def __init__(self, text: str) -> None:
        self.text = text
        # What ruamel would not give back: a byte order mark, CRLF line ends, the missing
        # newline at the end; kept here and put back by ``dump``.
        self._bom = "\ufeff" if text.startswith("\ufeff") else ""
        self._crlf = "\r\n" in text
        self._final_newline = text.endswith("\n")
        body = text.removeprefix(self._bom).replace("\r\n", "\n")
        mapping, offset = guess_indent(body)
        self._yaml = YAML(typ="rt")
        self._yaml.preserve_quotes = True
        self._yaml.width = 4096  # never fold a long line the file has
        self._yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
        self._yaml.explicit_start = body.startswith("---")
        try:
            self.root = self._yaml.load(body)
        except YAMLError as exc:
            raise ApiError(422, f"the config file cannot be edited: {exc}") from exc
        if not isinstance(self.root, CommentedMap):
            raise ApiError(422, "the config file is not a mapping")

    def check_round_trip(self) -> None:
        """422 unless the file, untouched, dumps back byte for byte: an edit must never
        reformat what it does not change (mixed indentation is what usually breaks it).
        Call it before editing."""
        again = self.dump()
        if again == self.text:
            return
        old, new = self.text.splitlines(), again.splitlines()
        at = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
                  min(len(old), len(new)))
        shown = repr(new[at]) if at < len(new) else "nothing"
        raise ApiError(422, f"the config file cannot be edited without reformatting it: "
                            f"line {at + 1} would become {shown} (mixed indentation?); make "
                            "its layout consistent, or change it in Git")

    def dump(self) -> str:
        out = io.StringIO()
        self._yaml.dump(self.root, out)
        text = out.getvalue()
        if not self._final_newline:
            text = text.removesuffix("\n")
        if self._crlf:
            text = text.replace("\n", "\r\n")
        return self._bom + text

    # ------------------------------------------------------------------ reading

    def route_names(self) -> list[str]:
        return [str(r.get("name")) for r in self._routes()]

    def rings(self, route: str) -> list[Spec]:
        return [_spec(r) for r in self._rings(route)]

    def ring(self, route: str, name: str) -> Spec:
        return _spec(self._rings(route)[self._ring_index(route, name)])

    def pools(self) -> dict[str, Spec]:
        return {str(k): _spec(v) for k, v in self._pools().items()}

    def pool(self, name: str) -> Spec:
        pools = self._pools()
        if name not in pools:
            raise ApiError(404, f"no pool {name!r} (pools: {', '.join(map(str, pools))})")
        return _spec(pools[name])

    # ------------------------------------------------------------------ rings

    def create_ring(self, route: str, spec: Spec, before: str | None = None) -> int:
        """Insert a ring; by default just before the default (last) ring, where it takes
        its buckets from the default's share and no other ring's users move.  Returns its
        position."""
        spec = _named(spec, "ring")
        rings = self._rings(route)
        if any(r.get("name") == spec["name"] for r in rings):
            raise ApiError(409, f"route {route!r} already has a ring {spec['name']!r}")
        at = self._ring_index(route, before) if before is not None else max(len(rings) - 1, 0)
        _insert(rings, at, _node(spec, top=True))
        return at

    def replace_ring(self, route: str, name: str, spec: Spec) -> None:
        spec = _same_name(spec, name, "ring")
        rings = self._rings(route)
        at = self._ring_index(route, name)
        _sync(rings, at, spec, f"routes.{route}.rings.{name}")

    def patch_ring(self, route: str, name: str, patch: Spec) -> Spec:
        """Apply a JSON merge patch (RFC 7396: null removes a key); the result."""
        spec = merge_patch(self.ring(route, name), patch)
        self.replace_ring(route, name, spec)
        return spec

    def delete_ring(self, route: str, name: str) -> None:
        rings = self._rings(route)
        _delete(rings, self._ring_index(route, name))

    # ------------------------------------------------------------------ pools

    def create_pool(self, name: str, spec: Spec) -> None:
        _check_name(name, "pool")
        pools = self._pools()
        if name in pools:
            raise ApiError(409, f"a pool {name!r} already exists")
        _insert(pools, len(pools), _node(spec, top=True), key=name)

    def replace_pool(self, name: str, spec: Spec) -> None:
        pools = self._pools()
        self.pool(name)  # 404 unless it exists
        _sync(pools, name, spec, f"pools.{name}")

    def patch_pool(self, name: str, patch: Spec) -> Spec:
        spec = merge_patch(self.pool(name), patch)
        self.replace_pool(name, spec)
        return spec

    def delete_pool(self, name: str) -> None:
        pools = self._pools()
        self.pool(name)
        _delete(pools, name)

    # ------------------------------------------------------------------ finding things

    def _routes(self) -> CommentedSeq:
        routes = self.root.get("routes")
        if not isinstance(routes, CommentedSeq):
            raise ApiError(422, "the config file has no list of routes")
        return routes

    def _route(self, name: str) -> CommentedMap:
        for route in self._routes():
            if isinstance(route, CommentedMap) and route.get("name") == name:
                return route
        raise ApiError(404, f"unknown route {name!r} (routes: {', '.join(self.route_names())})")

    def _rings(self, route: str) -> CommentedSeq:
        rings = self._route(route).get("rings")
        if not isinstance(rings, CommentedSeq):
            raise ApiError(422, f"route {route!r} has no list of rings in the file")
        return rings

    def _ring_index(self, route: str, name: str) -> int:
        for i, ring in enumerate(self._rings(route)):
            if isinstance(ring, CommentedMap) and ring.get("name") == name:
                return i
        raise ApiError(404, f"route {route!r} has no ring {name!r}")

    def _pools(self) -> CommentedMap:
        pools = self.root.get("pools")
        if pools is None:
            pools = self.root["pools"] = CommentedMap()
        if not isinstance(pools, CommentedMap):
            raise ApiError(422, "pools in the file is not a mapping")
        return pools


def read_back(text: str, route: str | None, name: str) -> Spec | None:
    """The ring (of ``route``) or pool (``route`` None) named ``name`` as the proxy's own
    YAML loader reads ``text``; None when absent.  An edit is kept only if this equals what
    was meant (YAML 1.1 and 1.2 read a few plain scalars differently)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    if route is None:
        pools = data.get("pools")
        found = pools.get(name) if isinstance(pools, dict) else None
        return found if isinstance(found, dict) else None
    for item in data.get("routes") or []:
        if isinstance(item, dict) and item.get("name") == route:
            for ring in item.get("rings") or []:
                if isinstance(ring, dict) and ring.get("name") == name:
                    return ring
    return None


# --------------------------------------------------------------------------- specs


def merge_patch(target: Spec, patch: Spec) -> Spec:
    """RFC 7396: objects merge key by key, null removes, anything else replaces."""
    merged = _merged(target, patch)
    return merged if isinstance(merged, dict) else {}


def _merged(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(400, f"{name!r} is not a valid {what} name; use letters, digits, '_', "
                            "'.', '-' (at most 63, starting with a letter or digit)")
    return name


def _named(spec: Spec, what: str) -> Spec:
    _check_name(spec.get("name"), what)
    return spec


def _same_name(spec: Spec, name: str, what: str) -> Spec:
    given = spec.get("name", name)
    if given != name:
        raise ApiError(400, f"the body names {what} {given!r}, the URL {name!r}; a {what} is "
                            "not renamed (create the new one, then delete the old)")
    return {"name": name, **spec}


# --------------------------------------------------------------------------- nodes


def _scalar(value: Any) -> Any:
    """A new string the proxy's YAML 1.1 loader would read as a string, quoted if need be."""
    if isinstance(value, str):
        tag = _RESOLVE(yaml.ScalarNode, value, (True, False))
        if tag != "tag:yaml.org,2002:str":
            return DoubleQuotedScalarString(value)
    return value


def _node(value: Any, top: bool = False, in_list: bool = False) -> Any:
    """A new node for ``value``: block style, except lists of scalars and small mappings of
    scalars inside lists (rules), which are written in flow style as the examples do."""
    if isinstance(value, dict):
        node = CommentedMap()
        for k, v in value.items():
            node[str(k)] = _node(v)
        if in_list and not top and len(value) <= 4 and not any(
                isinstance(v, dict | list) for v in value.values()):
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_node(v, in_list=True) for v in value)
        if not any(isinstance(v, dict | list) for v in value):
            seq.fa.set_flow_style()
        return seq
    return _scalar(value)


def _anchored(node: Any) -> bool:
    anchor = getattr(node, "anchor", None)
    return anchor is not None and getattr(anchor, "value", None) is not None


def _sync(parent: _Node, key: Any, spec: Any, where: str) -> None:
    """Make ``parent[key]`` equal ``spec``, changing only what differs (comments, order and
    style of what stays are kept)."""
    current = parent[key]
    if plain(current) == spec:
        return
    if isinstance(current, CommentedMap) and isinstance(spec, dict) and \
            not _anchored(current) and not current.merge:
        for k in [k for k in current if k not in spec]:
            _delete(current, k)
        for k, v in spec.items():
            if k in current:
                _sync(current, k, v, f"{where}.{k}")
            else:
                _insert(current, len(current), _node(v), key=k)
    elif _anchored(parent):
        raise ApiError(422, f"{where} is inside a YAML anchor (&) other places share; "
                            "change it in the file")
    else:
        _replace(parent, key, _node(value=spec, in_list=isinstance(parent, CommentedSeq)))
    if plain(parent[key]) != spec:
        raise ApiError(422, f"{where}: the file's merge key (<<) keeps a value the change "
                            "removes; change it in the file")


# Comment lines and blank lines after an item are, for ruamel, the comment of the item's
# last value (a token whose first line is that value's end-of-line comment).  Moving that
# "tail" keeps them in place when the item is replaced, followed or removed.


def _slot(parent: _Node, key: Any) -> list[Any]:
    entry = parent.ca.items.setdefault(key, [None, None, None, None]
                                       if isinstance(parent, CommentedMap) else [None, None])
    return list(entry) if not isinstance(entry, list) else entry


def _last_token(parent: _Node, key: Any, create: bool = False) -> CommentToken | None:
    """The comment token after the last scalar of ``parent[key]`` (made when ``create``)."""
    value = parent[key]
    if isinstance(value, CommentedMap | CommentedSeq) and len(value) and not value.fa.flow_style():
        inner = list(value.keys())[-1] if isinstance(value, CommentedMap) else len(value) - 1
        return _last_token(value, inner, create)
    index = 2 if isinstance(parent, CommentedMap) else 0
    entry = parent.ca.items.get(key)
    token = entry[index] if entry and len(entry) > index else None
    if isinstance(token, CommentToken) or not create:
        return token if isinstance(token, CommentToken) else None
    slot = _slot(parent, key)
    slot[index] = CommentToken("\n", CommentMark(0), None)
    parent.ca.items[key] = slot
    token = slot[index]
    return token if isinstance(token, CommentToken) else None


def _take_tail(parent: _Node, key: Any) -> str:
    token = _last_token(parent, key)
    if token is None or "\n" not in token.value:
        return ""
    head, _, tail = token.value.partition("\n")
    token.value = head + "\n"
    return tail


def _put_tail(parent: _Node, key: Any, tail: str) -> None:
    if not tail:
        return
    token = _last_token(parent, key, create=True)
    if token is not None:
        token.value = (token.value if token.value.endswith("\n") else token.value + "\n") + tail


def _keys(parent: _Node) -> list[Any]:
    return list(parent.keys()) if isinstance(parent, CommentedMap) else list(range(len(parent)))


def _insert(parent: _Node, at: int, node: Any, key: Any = None) -> None:
    keys = _keys(parent)
    last = at >= len(keys)
    tail = _take_tail(parent, keys[-1]) if last and keys else ""
    if isinstance(parent, CommentedMap):
        parent.insert(at, key, node)
        _put_tail(parent, key, tail)
    else:
        parent.insert(at, node)
        _put_tail(parent, at, tail)


def _replace(parent: _Node, key: Any, node: Any) -> None:
    tail = _take_tail(parent, key)
    parent[key] = node
    _put_tail(parent, key, tail)


def _delete(parent: _Node, key: Any) -> None:
    """Remove an item; what followed it (the next item's comment, blank lines) stays, on the
    item before it."""
    keys = _keys(parent)
    at = keys.index(key)
    tail = _take_tail(parent, key)
    del parent[key]  # ruamel shifts a sequence's comments (keyed by index) itself
    if at > 0:
        _put_tail(parent, keys[at - 1], tail)


__all__ = ["Document", "file_diff", "guess_indent", "merge_patch", "plain", "read_back",
           "revision"]

