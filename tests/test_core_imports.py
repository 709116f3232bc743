"""The pure core stays pure: no asyncio, aiohttp, prometheus_client or clock in it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = ["config", "values", "yamlsrc", "reader", "rules", "assigncfg", "assign", "table",
        "headers", "judge", "rollout", "rolloutcfg", "window", "errors"]
FORBIDDEN = {"asyncio", "aiohttp", "prometheus_client", "time", "uvloop", "socket",
             "proxy.handler", "proxy.server", "proxy.pool", "proxy.runtime", "proxy.control",
             "proxy.metrics", "proxy.reload", "proxy.webhooks", "proxy.statefile"}
PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io_and_no_clock(module: str) -> None:
    bad = {n for n in imports_of(module)
           if n in FORBIDDEN or any(n.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"proxy/{module}.py imports {sorted(bad)}"
