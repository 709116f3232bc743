"""The layout holds: the pure core stays pure, and the shell's layers import downwards only.

Whole subpackages are named, so a new module in a pure package is checked without anyone
remembering to list it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
# Decide, never do: no event loop, no sockets, no clock, no shell module.
PURE_PACKAGES = ["config", "routing", "rollout"]
PURE_MODULES = ["errors.py", "dataplane/headers.py", "dataplane/framing.py",
                "health/state.py", "health/retry.py"]
SHELL = ["proxy.dataplane.client", "proxy.dataplane.exchange", "proxy.dataplane.upstream",
         "proxy.dataplane.tunnel", "proxy.dataplane.listener", "proxy.dataplane.accesslog",
         "proxy.dataplane.decide", "proxy.dataplane.deadlines",
         "proxy.health.monitor", "proxy.health.checker",
         "proxy.control", "proxy.admin", "proxy.demo",
         "proxy.server", "proxy.runtime", "proxy.metrics", "proxy.reload", "proxy.cli",
         "proxy.tasks"]
FORBIDDEN = {"asyncio", "aiohttp", "prometheus_client", "time", "uvloop", "socket",
             "threading", "subprocess", *SHELL}


def pure_files() -> list[str]:
    files = [p for pkg in PURE_PACKAGES for p in sorted((PACKAGE / pkg).rglob("*.py"))]
    files += [PACKAGE / m for m in PURE_MODULES]
    return [str(p.relative_to(PACKAGE)) for p in files]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _hits(names: set[str], banned: set[str] | list[str]) -> set[str]:
    return {n for n in names if any(n == b or n.startswith(b + ".") for b in banned)}


def test_every_pure_package_is_found() -> None:
    files = pure_files()
    for pkg in PURE_PACKAGES:
        assert any(f.startswith(pkg + "/") and not f.endswith("__init__.py") for f in files)


@pytest.mark.parametrize("module", pure_files())
def test_core_module_imports_no_io_and_no_clock(module: str) -> None:
    bad = _hits(imports_of(PACKAGE / module), FORBIDDEN)
    assert not bad, f"proxy/{module} imports {sorted(bad)}"


def test_config_is_the_leaf_of_the_core() -> None:
    # Everything reads the config; the config reads nothing of the rest.
    for path in sorted((PACKAGE / "config").rglob("*.py")):
        bad = _hits(imports_of(path), ["proxy.routing", "proxy.rollout", "proxy.dataplane"])
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_admin_never_imports_the_server() -> None:
    # The server builds the admin app; the admin side names what it uses in a Protocol.
    for path in sorted((PACKAGE / "admin").rglob("*.py")):
        bad = _hits(imports_of(path), ["proxy.server", "proxy.demo", "proxy.cli"])
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
