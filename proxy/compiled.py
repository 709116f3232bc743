"""Which of the request path's modules run compiled by mypyc, and whether one is stale.

``MODULES`` is the one list: ``setup.py`` compiles these (it reads this file on its own,
so nothing here may import beyond the standard library).  A module runs compiled when its
import found the C extension beside its ``.py`` (Python prefers the extension).

Stale: in a source checkout (an editable install) the extension is built once by
``pip install -e .``; a ``.py`` edited later is *not* what runs until the next install.
``stale()`` names such modules; the start-up log warns and the test suite refuses to run
(it would test the old code).

``RINGPROXY_PURE_PYTHON=1`` in the environment runs the ``.py`` files even where the
extensions are installed (``prefer_source``, from ``proxy/__init__.py``): to debug the
data plane with pdb, to compare the two, and for the tests that inject a fault by
replacing a method (a compiled class's methods cannot be replaced).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

PURE_ENV = "RINGPROXY_PURE_PYTHON"

MODULES = (
    "proxy.dataplane.accesslog",
    "proxy.dataplane.client",
    "proxy.dataplane.deadlines",
    "proxy.dataplane.decide",
    "proxy.dataplane.exchange",
    "proxy.dataplane.framing",
    "proxy.dataplane.headers",
    "proxy.dataplane.request",
    "proxy.dataplane.upstream",
    "proxy.dataplane.tunnel",
    "proxy.dataplane.ratelimit",
    "proxy.routing.assign",
    "proxy.routing.predicates",
    "proxy.routing.table",
    "proxy.rollout.window",
    "proxy.rollout.sketch",
    "proxy.rollout.evidence",
    "proxy.workers.deltas",
    "proxy.metrics",
    "proxy.runtime",
)

# A wheel's files are written within moments of each other, in any order: only a source
# newer than its extension by more than this counts as edited after the build.
_SLACK_S = 2.0


def source_paths() -> list[str]:
    """The modules' files relative to the project root (what ``setup.py`` compiles)."""
    return [name.replace(".", "/") + ".py" for name in MODULES]


def _origin(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    spec = importlib.util.find_spec(name)
    return spec.origin if spec is not None else None


def compiled() -> list[str]:
    """The modules that import as compiled extensions."""
    return [name for name in MODULES if (_origin(name) or "").endswith((".so", ".pyd"))]


def describe() -> str:
    """One line for ``--version`` and the start-up log."""
    done = compiled()
    if not done and os.environ.get(PURE_ENV):
        return f"data plane: interpreted ({PURE_ENV} is set)"
    if len(done) == len(MODULES):
        return "data plane: compiled (mypyc)"
    if not done:
        return "data plane: interpreted (pure Python; see setup.py to compile it)"
    return f"data plane: {len(done)} of {len(MODULES)} modules compiled (mypyc)"


def stale() -> list[str]:
    """Compiled modules whose ``.py`` beside the extension is newer than it."""
    found = []
    for name in MODULES:
        origin = _origin(name)
        if not origin or not origin.endswith((".so", ".pyd")):
            continue
        source = os.path.join(os.path.dirname(origin), name.rsplit(".", 1)[1] + ".py")
        try:
            if os.path.getmtime(source) > os.path.getmtime(origin) + _SLACK_S:
                found.append(source)
        except OSError:
            continue
    return found


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds ``MODULES`` as their ``.py`` files, before the extensions beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES or not path:
            return None
        leaf = fullname.rsplit(".", 1)[1] + ".py"
        for folder in path:
            source = os.path.join(folder, leaf)
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def prefer_source() -> None:
    """Import ``MODULES`` from source from now on (before any of them is imported)."""
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())
