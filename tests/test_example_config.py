"""config/example.yaml shows every key the config reader accepts (issue 16 point 3): each
property of the JSON Schema (itself checked against the reader's keys, section by section,
in test_schema.py) is named in the file, as a key or in a comment next to its section."""

from __future__ import annotations

import re
from typing import Any

from proxy.config import load_config
from proxy.config.schema import config_schema
from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "example.yaml"


def schema_keys(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted path, key) of every property in the schema."""
    found: list[tuple[str, str]] = []
    if not isinstance(node, dict):
        return found
    for sub in node.get("anyOf", []):
        found += schema_keys(sub, path)
    if "items" in node:
        found += schema_keys(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += schema_keys(node["additionalProperties"], path + ".*")
    for key, value in node.get("properties", {}).items():
        where = f"{path}.{key}" if path else key
        found.append((where, key))
        found += schema_keys(value, where)
    return found


def test_the_example_names_every_key_of_the_schema() -> None:
    text = EXAMPLE.read_text()
    missing = sorted({where for where, key in schema_keys(config_schema())
                      if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text)})
    assert not missing, f"config/example.yaml does not show: {', '.join(missing)}"


def test_the_example_is_a_valid_config() -> None:
    config = load_config(str(EXAMPLE))
    assert config.routes and config.pools
